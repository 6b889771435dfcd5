//! The model registry: `models.toml`, compiled into the binary so that names work on a machine with nothing
//! but the executable.

use serde::Deserialize;

/// The registry as shipped (the repository's `models.toml`).
pub const BUILTIN: &str = include_str!("../models.toml");

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
            quarry_quantize::hf::HfConfig::parse(&path, &m.config_json())
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        }
    }
}
