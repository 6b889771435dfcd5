//! `config.json` of a Hugging Face Granite checkpoint, parsed into a checked [`HfConfig`].
//!
//! The fields are read by name from the JSON object rather than through a derived struct so that each problem can
//! be reported with the field's name ("`hidden_size` must be a positive integer, found \"64\""), and every size is
//! validated here, once, so the rest of the converter can multiply them without surprises.

use std::path::Path;

use serde_json::{Map, Value};

use crate::architecture::Architecture;
use crate::error::ConvertError;

/// What the error for an unknown architecture lists.
pub const SUPPORTED_ARCHITECTURES: &str =
    "GraniteMoeForCausalLM (model_type granitemoe) and GraniteForCausalLM (model_type granite)";

/// Sizes beyond this are refused as implausible: it keeps every product of two sizes far from overflow and stops
/// a hostile config from sizing huge allocations (the vocabulary table is allocated from `vocab_size`).
const MAX_SIZE: u64 = 1 << 24;

/// The expert block of a MoE model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub num_local_experts: usize,
    /// Experts used per token (top-k), 1..=`num_local_experts`.
    pub num_experts_per_tok: usize,
}

/// A validated Granite config: every size non-zero and consistent (heads divide the hidden size, kv heads divide the
/// heads, the head dimension is even for RoPE, top-k within the experts).
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The FFN width: per expert for MoE models.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub embedding_multiplier: f32,
    pub attention_multiplier: f32,
    pub residual_multiplier: f32,
    /// Logits are divided by it.
    pub logits_scaling: f32,
    /// When true the checkpoint has no `lm_head.weight`; the embedding is the output head.
    pub tie_word_embeddings: bool,
    /// `None` for the dense architecture.
    pub moe: Option<MoeConfig>,
}

impl HfConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<HfConfig, ConvertError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConvertError::MissingFile {
                path: path.clone(),
                hint: "a Hugging Face model folder needs its config.json (download it with the weights)",
            },
            _ => ConvertError::read(&path, e),
        })?;
        HfConfig::parse(&path, &text)
    }

    /// Parses and checks the text of a config.json; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<HfConfig, ConvertError> {
        let json: Value = serde_json::from_str(text).map_err(|source| ConvertError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(map) = json else {
            return Err(config_error(
                path,
                "the top level is not a JSON object".into(),
            ));
        };
        let fields = Fields { path, map: &map };
        let architecture = fields.architecture()?;
        let num_attention_heads = fields.size("num_attention_heads")?;
        let config = HfConfig {
            architecture,
            vocab_size: fields.size("vocab_size")?,
            hidden_size: fields.size("hidden_size")?,
            intermediate_size: fields.size("intermediate_size")?,
            num_hidden_layers: fields.size("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: match fields.optional("num_key_value_heads") {
                Some(_) => fields.size("num_key_value_heads")?,
                None => num_attention_heads,
            },
            max_position_embeddings: fields.size("max_position_embeddings")?,
            rope_theta: fields.positive_f32("rope_theta")?,
            rms_norm_eps: fields.positive_f32("rms_norm_eps")?,
            embedding_multiplier: fields.positive_f32("embedding_multiplier")?,
            attention_multiplier: fields.positive_f32("attention_multiplier")?,
            residual_multiplier: fields.positive_f32("residual_multiplier")?,
            logits_scaling: fields.positive_f32("logits_scaling")?,
            tie_word_embeddings: fields.bool_or("tie_word_embeddings", true)?,
            moe: match architecture {
                Architecture::GraniteMoe => Some(MoeConfig {
                    num_local_experts: fields.size("num_local_experts")?,
                    num_experts_per_tok: fields.size("num_experts_per_tok")?,
                }),
                Architecture::Granite => None,
            },
        };
        fields.refuse_unsupported_features()?;
        config.check_consistency(path)?;
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the K and V projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    fn check_consistency(&self, path: &Path) -> Result<(), ConvertError> {
        let fail = |problem: String| Err(config_error(path, problem));
        let (hidden, heads, kv_heads) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        if !hidden.is_multiple_of(heads) {
            return fail(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "the head dimension hidden_size / num_attention_heads = {} is odd; RoPE rotates pairs",
                self.head_dim()
            ));
        }
        if !heads.is_multiple_of(kv_heads) {
            return fail(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if let Some(moe) = self.moe
            && moe.num_experts_per_tok > moe.num_local_experts
        {
            return fail(format!(
                "num_experts_per_tok {} is more than num_local_experts {}",
                moe.num_experts_per_tok, moe.num_local_experts
            ));
        }
        Ok(())
    }
}

fn config_error(path: &Path, problem: String) -> ConvertError {
    ConvertError::Config {
        path: path.to_path_buf(),
        problem,
    }
}

/// Typed access to the fields of the config object, with errors that name the field.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    /// A field that is present and not `null` (HF writes `null` for "not set").
    fn optional(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str) -> Result<&Value, ConvertError> {
        self.optional(key).ok_or_else(|| {
            config_error(self.path, format!("the required field `{key}` is missing"))
        })
    }

    fn invalid(&self, key: &str, wanted: &str, found: &Value) -> ConvertError {
        config_error(
            self.path,
            format!("`{key}` must be {wanted}, found {}", short(found)),
        )
    }

    fn size(&self, key: &str) -> Result<usize, ConvertError> {
        let value = self.required(key)?;
        match value.as_u64() {
            Some(n) if (1..=MAX_SIZE).contains(&n) => Ok(n as usize),
            _ => Err(self.invalid(key, &format!("an integer from 1 to {MAX_SIZE}"), value)),
        }
    }

    fn positive_f32(&self, key: &str) -> Result<f32, ConvertError> {
        let value = self.required(key)?;
        match value.as_f64().map(|v| v as f32) {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(self.invalid(key, "a positive number", value)),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConvertError> {
        match self.optional(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.invalid(key, "true or false", other)),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ConvertError> {
        match self.optional(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(key, "a string", other)),
        }
    }

    /// `architectures[0]` decides (it names the class transformers instantiates); `model_type` is used when that
    /// list is absent, and must agree with it when both are given.
    fn architecture(&self) -> Result<Architecture, ConvertError> {
        let model_type = self.string("model_type")?;
        let class = match self.optional("architectures") {
            None => None,
            Some(Value::Array(list)) => match list.first() {
                Some(Value::String(class)) => Some(class.as_str()),
                _ => {
                    return Err(self.invalid(
                        "architectures",
                        "a list of class names",
                        &Value::Array(list.clone()),
                    ));
                }
            },
            Some(other) => {
                return Err(self.invalid("architectures", "a list of class names", other));
            }
        };
        let unsupported = |name: String| ConvertError::UnsupportedArchitecture {
            path: self.path.to_path_buf(),
            architecture: name,
        };
        match (class, model_type) {
            (Some(class), model_type) => {
                let arch = Architecture::from_hf_class(class).ok_or_else(|| {
                    unsupported(match model_type {
                        Some(t) => format!("{class} (model_type {t})"),
                        None => class.to_string(),
                    })
                })?;
                match model_type {
                    Some(t) if t != arch.gguf_name() => Err(config_error(
                        self.path,
                        format!(
                            "architectures says {class} but model_type is {t:?} (expected {:?})",
                            arch.gguf_name()
                        ),
                    )),
                    _ => Ok(arch),
                }
            }
            (None, Some(t)) => Architecture::from_gguf_name(t)
                .ok_or_else(|| unsupported(format!("model_type {t}"))),
            (None, None) => Err(config_error(
                self.path,
                "neither `architectures` nor `model_type` says what model this is".into(),
            )),
        }
    }

    /// Features of the HF classes that these files cannot express or this converter does not carry over: refused
    /// rather than silently dropped, since the result would load and produce wrong text.
    fn refuse_unsupported_features(&self) -> Result<(), ConvertError> {
        if let Some(act) = self.string("hidden_act")?
            && act != "silu"
        {
            return Err(config_error(
                self.path,
                format!("hidden_act {act:?} is not supported (Granite uses \"silu\")"),
            ));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if self.bool_or(key, false)? {
                return Err(config_error(
                    self.path,
                    format!("`{key}` is true, but biases are not supported (Granite has none)"),
                ));
            }
        }
        if let Some(scaling) = self.optional("rope_scaling") {
            return Err(config_error(
                self.path,
                format!(
                    "rope_scaling {} is not supported (Granite 3.x has none)",
                    short(scaling)
                ),
            ));
        }
        if let Some(head_dim) = self.optional("head_dim") {
            let hidden = self.size("hidden_size")? as u64;
            let heads = self.size("num_attention_heads")? as u64;
            if head_dim.as_u64() != Some(hidden / heads) {
                return Err(config_error(
                    self.path,
                    format!(
                        "head_dim {} differs from hidden_size / num_attention_heads = {}, which llama.cpp assumes",
                        short(head_dim),
                        hidden / heads
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A JSON value for an error message, cut short.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOE: &str = r#"{
        "architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe",
        "vocab_size": 400, "hidden_size": 64, "intermediate_size": 24, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
        "rope_theta": 10000, "rms_norm_eps": 1e-6, "embedding_multiplier": 12.0,
        "attention_multiplier": 0.125, "residual_multiplier": 0.22, "logits_scaling": 6.0,
        "num_local_experts": 16, "num_experts_per_tok": 4, "rope_scaling": null, "hidden_act": "silu"
    }"#;

    fn parse(text: &str) -> Result<HfConfig, String> {
        HfConfig::parse(Path::new("m/config.json"), text).map_err(|e| e.to_string())
    }

    fn with(key: &str, value: &str) -> String {
        let mut map: Map<String, Value> = serde_json::from_str(MOE).unwrap();
        if value == "REMOVE" {
            map.remove(key);
        } else {
            map.insert(key.into(), serde_json::from_str(value).unwrap());
        }
        Value::Object(map).to_string()
    }

    #[test]
    fn parses_a_moe_config_with_defaults() {
        let c = parse(&with("tie_word_embeddings", "REMOVE")).unwrap();
        assert_eq!(c.architecture, Architecture::GraniteMoe);
        assert_eq!((c.head_dim(), c.kv_dim()), (8, 32));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.moe.map(|m| m.num_experts_per_tok), Some(4));
        assert_eq!(c.attention_multiplier, 0.125);
        let c = parse(&with("num_key_value_heads", "REMOVE")).unwrap();
        assert_eq!(c.num_key_value_heads, 8);
    }

    #[test]
    fn refuses_bad_values_naming_the_field() {
        let cases = [
            ("hidden_size", "REMOVE", "`hidden_size` is missing"),
            ("hidden_size", "\"64\"", "`hidden_size` must be an integer"),
            ("hidden_size", "0", "`hidden_size` must be an integer"),
            ("vocab_size", "1e12", "`vocab_size` must be an integer"),
            ("hidden_size", "60", "not a multiple of num_attention_heads"),
            ("num_attention_heads", "64", "is odd"),
            (
                "num_key_value_heads",
                "3",
                "not a multiple of num_key_value_heads",
            ),
            ("num_experts_per_tok", "17", "more than num_local_experts"),
            (
                "num_local_experts",
                "REMOVE",
                "`num_local_experts` is missing",
            ),
            (
                "rms_norm_eps",
                "-1",
                "`rms_norm_eps` must be a positive number",
            ),
            ("logits_scaling", "REMOVE", "`logits_scaling` is missing"),
            ("tie_word_embeddings", "\"yes\"", "must be true or false"),
            (
                "rope_scaling",
                r#"{"type": "linear", "factor": 2}"#,
                "rope_scaling",
            ),
            ("hidden_act", "\"gelu\"", "hidden_act"),
            ("attention_bias", "true", "biases"),
            ("head_dim", "16", "head_dim 16 differs"),
            ("model_type", "\"granite\"", "model_type is \"granite\""),
        ];
        for (key, value, expected) in cases {
            let err = parse(&with(key, value)).unwrap_err();
            assert!(err.starts_with("m/config.json: "), "{err}");
            assert!(err.contains(expected), "{key}={value}: {err}");
        }
    }

    #[test]
    fn names_unsupported_architectures_and_lists_the_supported_ones() {
        let err = parse(&with("architectures", r#"["LlamaForCausalLM"]"#)).unwrap_err();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
        assert!(
            err.contains("GraniteMoeForCausalLM") && err.contains("GraniteForCausalLM"),
            "{err}"
        );
        let dense = with("architectures", r#"["GraniteForCausalLM"]"#)
            .replace("\"granitemoe\"", "\"granite\"");
        let c = parse(&dense).unwrap();
        assert_eq!((c.architecture, c.moe), (Architecture::Granite, None));
    }

    #[test]
    fn malformed_json_names_the_file() {
        let err = parse("{\"vocab_size\": 4").unwrap_err();
        assert!(err.starts_with("m/config.json: not valid JSON"), "{err}");
    }
}
