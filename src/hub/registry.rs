//! The model registry: `models.toml`, compiled into the binary so that names work on a machine with nothing
//! but the executable.

use serde::Deserialize;

/// The registry as shipped (the repository's `models.toml`).
pub const BUILTIN: &str = include_str!("../../models.toml");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("models.toml: {0}")]
    Parse(String),
    #[error("'{name}' is not in the model registry (known: {known}); `quarry list` shows them")]
    Unknown { name: String, known: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// The model `quarry chat` uses when none is named.
    pub default: String,
    pub models: Vec<RegistryModel>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryModel {
    pub name: String,
    /// Hugging Face repo id.
    pub repo: String,
    pub revision: String,
    pub description: String,
    /// The type `pull` converts to (`q4_0`, `q8_0`, ...).
    pub default_type: String,
    /// Positions the model was trained for (config.json `max_position_embeddings`; a test keeps them equal).
    pub context_length: usize,
    /// Files of the snapshot with what is known about them. `pull` takes the file list from the Hub when it can
    /// (sharded weights are not listed here) and uses these entries for their checksums.
    pub files: Vec<RegistryFile>,
    /// The fields of the model's config.json that fix its shape, under their config.json names.
    pub config: toml::Table,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub name: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

impl Registry {
    pub fn builtin() -> Registry {
        Self::parse(BUILTIN).expect("the built-in models.toml is checked by a test")
    }

    pub fn parse(text: &str) -> Result<Registry, RegistryError> {
        let r: Registry = toml::from_str(text).map_err(|e| RegistryError::Parse(e.to_string()))?;
        if r.find(&r.default).is_none() {
            return Err(RegistryError::Parse(format!(
                "the default model '{}' is not listed",
                r.default
            )));
        }
        Ok(r)
    }

    pub fn find(&self, name: &str) -> Option<&RegistryModel> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The entry for a Hugging Face repo id (`ibm-granite/granite-3.0-2b-instruct`), so that pulling a registry
    /// model by its repo id still checks the registry's checksums.
    pub fn find_repo(&self, repo: &str) -> Option<&RegistryModel> {
        self.models
            .iter()
            .find(|m| m.repo.eq_ignore_ascii_case(repo))
    }

    pub fn get(&self, name: &str) -> Result<&RegistryModel, RegistryError> {
        self.find(name).ok_or_else(|| RegistryError::Unknown {
            name: name.to_string(),
            known: self
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl RegistryModel {
    /// What the registry knows about one file of the snapshot.
    pub fn file(&self, name: &str) -> Option<&RegistryFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The architecture summary as config.json text, for the converter's config parser.
    pub fn config_json(&self) -> String {
        serde_json::to_string_pretty(&self.config).expect("a TOML table serializes as JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses_and_every_config_is_a_valid_granite_config() {
        let r = Registry::builtin();
        assert!(r.find(&r.default).is_some());
        for m in &r.models {
            let path = std::path::PathBuf::from(format!("models.toml[{}]", m.name));
            let config = quarry_quantize::hf::HfConfig::parse(&path, &m.config_json())
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(
                config.max_position_embeddings, m.context_length,
                "{}: context_length differs from max_position_embeddings",
                m.name
            );
        }
    }

    #[test]
    fn builtin_registry_entries_are_consistent() {
        let r = Registry::builtin();
        let mut names = std::collections::HashSet::new();
        for m in &r.models {
            assert!(names.insert(&m.name), "{} is listed twice", m.name);
            assert!(
                m.default_type
                    .parse::<quarry_quantize::TargetType>()
                    .is_ok(),
                "{}: default_type {}",
                m.name,
                m.default_type
            );
            assert!(
                m.repo.split('/').count() == 2 && !m.revision.is_empty(),
                "{}: repo {} revision {}",
                m.name,
                m.repo,
                m.revision
            );
            assert!(
                m.file("config.json").is_some(),
                "{}: no config.json",
                m.name
            );
            for f in &m.files {
                if let Some(sha) = &f.sha256 {
                    assert!(
                        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{}: {} has a malformed sha256",
                        m.name,
                        f.name
                    );
                    assert!(
                        f.size.is_some(),
                        "{}: {} has a sha256 but no size",
                        m.name,
                        f.name
                    );
                }
            }
            assert_eq!(r.find_repo(&m.repo).map(|x| &x.name), Some(&m.name));
        }
    }
}
