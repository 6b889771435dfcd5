//! Granite checkpoint (Hugging Face folder) -> one GGUF file that llama.cpp and Quarry load; and a GGUF file -> the
//! same model at another type ([`requantize()`]).
//!
//! The conversion is planned completely first (config, weights, tokenizer all checked; every tensor's name, shape
//! and type decided), then streamed: each output tensor is produced a chunk of rows at a time from the mapped
//! checkpoint (converted to f32, RoPE rows permuted, encoded in parallel) and written straight to `OUT.part`.
//! Peak memory is a few chunk buffers plus the tokenizer metadata, whatever the model size.

pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod metadata;
pub(crate) mod output;
pub(crate) mod plan;
pub(crate) mod requantize;
pub(crate) mod vocab;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

pub use decode::{can_decode, decode_values};
pub use metadata::QUANTIZATION_VERSION;
pub use plan::{Recipe, Role, layer_of, role_of_gguf_tensor, use_more_bits};
pub use requantize::{RequantizeOptions, requantize};
pub use vocab::pre_tokenizer_name;

use self::encode::{RowEncoder, permute_rope_rows};
use self::output::{TensorSink, write_gguf};
use self::plan::PlannedTensor;
use self::vocab::Vocab;
use crate::architecture::Architecture;
use crate::error::ConvertError;
use crate::gguf::{GgmlType, TensorSpec, TypeTally};
use crate::hf::HfConfig;
use crate::safetensors::{Checkpoint, TensorView};

/// f32 values converted per chunk: 16 MiB, so a chunk and its encoding stay small next to any model.
const CHUNK_VALUES: usize = 4 << 20;

/// The file types `quarry quantize` makes: one block type for (almost) every matrix, or one of llama.cpp's mixes
/// (the k-quants and the IQ4 types), which give the most sensitive matrices more bits (see [`Recipe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum TargetType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// llama-quantize's `Q4_K_M`: Q4_K, with Q6_K for the output head and for attn_v / ffn_down in half the layers.
    Q4_K_M,
    /// llama-quantize's `Q5_K_M`: Q5_K, with Q6_K for the output head and for attn_v / ffn_down in half the layers.
    Q5_K_M,
    /// llama-quantize's `Q6_K`: Q6_K for every matrix.
    Q6_K,
    /// llama-quantize's `IQ4_NL` (4.5 bits per weight): IQ4_NL, Q4_0's layout with 16 non-linear levels, with Q6_K
    /// for the output head (and Q5_K or Q8_0 for a few matrices in some shapes of model, see [`Recipe`]).
    IQ4_NL,
    /// llama-quantize's `IQ4_XS` (4.25 bits per weight): IQ4_XS, IQ4_NL's levels in 256-weight super-blocks with
    /// 6-bit sub-block scales, with Q6_K for the output head (and more, as [`TargetType::IQ4_NL`]).
    IQ4_XS,
}

impl TargetType {
    pub const ALL: [TargetType; 9] = [
        TargetType::F32,
        TargetType::F16,
        TargetType::Q8_0,
        TargetType::Q4_0,
        TargetType::Q4_K_M,
        TargetType::Q5_K_M,
        TargetType::Q6_K,
        TargetType::IQ4_NL,
        TargetType::IQ4_XS,
    ];

    /// The block type of most matrices (for a mix, the type the recipe starts from).
    pub fn ggml_type(self) -> GgmlType {
        match self {
            TargetType::F32 => GgmlType::F32,
            TargetType::F16 => GgmlType::F16,
            TargetType::Q8_0 => GgmlType::Q8_0,
            TargetType::Q4_0 => GgmlType::Q4_0,
            TargetType::Q4_K_M => GgmlType::Q4_K,
            TargetType::Q5_K_M => GgmlType::Q5_K,
            TargetType::Q6_K => GgmlType::Q6_K,
            TargetType::IQ4_NL => GgmlType::IQ4_NL,
            TargetType::IQ4_XS => GgmlType::IQ4_XS,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype` in `include/llama.h`: ALL_F32 0, MOSTLY_F16 1,
    /// MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_Q4_K_M 15, MOSTLY_Q5_K_M 17, MOSTLY_Q6_K 18, MOSTLY_IQ4_NL 25,
    /// MOSTLY_IQ4_XS 30).
    pub fn file_type(self) -> u32 {
        match self {
            TargetType::F32 => 0,
            TargetType::F16 => 1,
            TargetType::Q4_0 => 2,
            TargetType::Q8_0 => 7,
            TargetType::Q4_K_M => 15,
            TargetType::Q5_K_M => 17,
            TargetType::Q6_K => 18,
            TargetType::IQ4_NL => 25,
            TargetType::IQ4_XS => 30,
        }
    }

    /// The name users type (`--type`), lower case; parsing ignores case, so llama-quantize's `Q4_K_M` works too.
    pub fn name(self) -> &'static str {
        match self {
            TargetType::F32 => "f32",
            TargetType::F16 => "f16",
            TargetType::Q8_0 => "q8_0",
            TargetType::Q4_0 => "q4_0",
            TargetType::Q4_K_M => "q4_k_m",
            TargetType::Q5_K_M => "q5_k_m",
            TargetType::Q6_K => "q6_k",
            TargetType::IQ4_NL => "iq4_nl",
            TargetType::IQ4_XS => "iq4_xs",
        }
    }

    /// One of llama.cpp's k-quant file types, whose recipe depends on the tensor's name and layer.
    pub fn is_k_quant(self) -> bool {
        matches!(
            self,
            TargetType::Q4_K_M | TargetType::Q5_K_M | TargetType::Q6_K
        )
    }

    /// One of llama.cpp's IQ4 file types, whose recipe (like a k-quant's) depends on the tensor's name and layer,
    /// and on the model's attention grouping.
    pub fn is_iq4(self) -> bool {
        matches!(self, TargetType::IQ4_NL | TargetType::IQ4_XS)
    }
}

impl fmt::Display for TargetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TargetType {
    type Err = String;
    fn from_str(s: &str) -> Result<TargetType, String> {
        TargetType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown type {s:?}: choose f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_nl or iq4_xs"
                )
            })
    }
}

/// What to convert, into what.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The Hugging Face snapshot folder.
    pub input: PathBuf,
    /// The GGUF file to write (replaced only once the new one is complete).
    pub output: PathBuf,
    pub target: TargetType,
    /// Type of the output head (tied `token_embd`, or `output.weight`) and of an untied input embedding; `None`
    /// takes the recipe's default (see [`Recipe`]). A mix stands for its base type (`q4_k_m`: Q4_K; `iq4_xs`: IQ4_XS).
    pub embedding_type: Option<TargetType>,
    /// Draw a progress bar on stderr; indicatif hides it when stderr is not a terminal.
    pub progress: bool,
    /// Worker threads; `None` uses rayon's global pool (one per core).
    pub threads: Option<usize>,
    /// `general.name`; `None` derives it from the folder (the repository name for a HF cache snapshot).
    pub model_name: Option<String>,
}

impl ConvertOptions {
    pub fn new(
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
        target: TargetType,
    ) -> ConvertOptions {
        ConvertOptions {
            input: input.into(),
            output: output.into(),
            target,
            embedding_type: None,
            progress: false,
            threads: None,
            model_name: None,
        }
    }
}

/// One tensor as written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorReport {
    pub name: String,
    /// ggml order.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Set when the recipe's block type could not hold rows of this length and `ty` (Q8_0 or F16) was written
    /// instead.
    pub fell_back_from: Option<GgmlType>,
}

/// What [`convert`] (or [`synthesize`](crate::synthesize)) wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub architecture: Architecture,
    pub target: TargetType,
    pub tensors: Vec<TensorReport>,
    /// Checkpoint tensors the GGUF has no use for (e.g. `lm_head.weight` of a tied model); none for `synthesize`.
    pub unused_source_tensors: Vec<String>,
    /// Input tensors that were already quantized and were dequantized before being quantized again (only
    /// [`requantize()`] with `allow_requantize`), with their input type.
    pub dequantized: Vec<(String, GgmlType)>,
    pub parameters: u64,
    pub file_bytes: u64,
    pub elapsed: Duration,
}

impl ConvertReport {
    /// The report of a file of `config`'s model written from `tensors`, started at `started`.
    pub(crate) fn new(
        output: &Path,
        config: &HfConfig,
        target: TargetType,
        tensors: Vec<PlannedTensor>,
        file_bytes: u64,
        started: Instant,
    ) -> ConvertReport {
        ConvertReport::from_plan(
            output,
            config.architecture,
            target,
            tensors,
            file_bytes,
            started,
        )
    }

    /// The report of a file written from `tensors`, started at `started`.
    pub(crate) fn from_plan(
        output: &Path,
        architecture: Architecture,
        target: TargetType,
        tensors: Vec<PlannedTensor>,
        file_bytes: u64,
        started: Instant,
    ) -> ConvertReport {
        ConvertReport {
            output: output.to_path_buf(),
            architecture,
            target,
            parameters: tensors.iter().map(PlannedTensor::n_elements).sum(),
            tensors: tensors
                .into_iter()
                .map(|t| TensorReport {
                    name: t.name,
                    dims: t.dims,
                    ty: t.ty,
                    fell_back_from: t.fell_back_from,
                })
                .collect(),
            unused_source_tensors: Vec::new(),
            dequantized: Vec::new(),
            file_bytes,
            elapsed: started.elapsed(),
        }
    }

    /// Tensors written at another type than the recipe's because their rows are not whole blocks of it.
    pub fn fallbacks(&self) -> impl Iterator<Item = &TensorReport> {
        self.tensors.iter().filter(|t| t.fell_back_from.is_some())
    }

    /// The tensors written, counted per type, in first-seen order.
    pub fn type_counts(&self) -> Vec<TypeTally> {
        TypeTally::of(self.tensors.iter().map(|t| {
            let spec = TensorSpec::new(&t.name, &t.dims, t.ty);
            (t.ty, t.dims.iter().product(), spec.size().unwrap_or(0))
        }))
    }
}

/// Runs `work` on a rayon pool of `threads` workers, or on the current (global) pool when `None`.
pub(crate) fn on_pool<T: Send>(
    threads: Option<usize>,
    work: impl FnOnce() -> Result<T, ConvertError> + Send,
) -> Result<T, ConvertError> {
    match threads {
        None => work(),
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| ConvertError::Threads {
                threads,
                problem: e.to_string(),
            })?
            .install(work),
    }
}

/// Converts the snapshot `opts.input` to the GGUF file `opts.output`.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport, ConvertError> {
    on_pool(opts.threads, || convert_on_current_pool(opts))
}

fn convert_on_current_pool(opts: &ConvertOptions) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let config = HfConfig::load(&opts.input)?;
    let checkpoint = Checkpoint::open(&opts.input)?;
    let tensors = plan::plan(&config, opts.target, opts.embedding_type);
    plan::check_sources(&tensors, &checkpoint)?;
    let vocab = Vocab::load(&opts.input, config.vocab_size)?;
    let name = opts
        .model_name
        .clone()
        .unwrap_or_else(|| model_name(&opts.input));
    let metadata = metadata::build(&config, &vocab, &tensors, opts.target, &name);
    drop(vocab);

    let file_bytes = write_gguf(
        &opts.output,
        metadata,
        &tensors,
        opts.progress,
        |tensor, sink| {
            let source = checkpoint.tensor(&tensor.source)?;
            write_tensor(sink, &source, tensor)
        },
    )?;

    let used: std::collections::HashSet<&str> = tensors.iter().map(|t| t.source.as_str()).collect();
    let unused_source_tensors = checkpoint
        .tensor_names()
        .into_iter()
        .filter(|n| !used.contains(n))
        .map(String::from)
        .collect();
    Ok(ConvertReport {
        unused_source_tensors,
        ..ConvertReport::new(
            &opts.output,
            &config,
            opts.target,
            tensors,
            file_bytes,
            started,
        )
    })
}

/// Streams one tensor: chunks of source rows -> f32 -> (RoPE permutation) -> encoded bytes -> the sink.
fn write_tensor(
    sink: &mut TensorSink<'_>,
    source: &TensorView<'_>,
    tensor: &PlannedTensor,
) -> Result<(), ConvertError> {
    let row_len = tensor.row_len();
    // Chunks hold whole heads when rows are permuted within heads.
    let group = tensor.rope_head_dim.unwrap_or(1);
    let rows_per_chunk = ((CHUNK_VALUES / row_len.max(1)) / group).max(1) * group;
    let mut values = Vec::new();
    let mut permuted = Vec::new();
    let mut encoder = RowEncoder::new(tensor.ty);
    for run in &tensor.source_rows {
        let mut first = run.start;
        while first < run.end {
            let rows = rows_per_chunk.min(run.end - first);
            values.resize(rows * row_len, 0.0);
            if let Some(at) = read_rows_parallel(source, first, row_len, &mut values) {
                return Err(ConvertError::NonFinite {
                    path: source.file.to_path_buf(),
                    tensor: source.name.to_string(),
                    row: first + at / row_len,
                    value: values[at],
                });
            }
            let chunk = match tensor.rope_head_dim {
                Some(head_dim) => {
                    permute_rope_rows(&values, row_len, head_dim, &mut permuted);
                    &permuted
                }
                None => &values,
            };
            sink.write(encoder.encode(chunk, row_len), chunk.len() as u64)?;
            source.release_rows(first, rows);
            first += rows;
        }
    }
    // The kernel maps a few pages around each fault, some outside the rows just released; drop them too.
    source.release_rows(0, source.n_rows());
    Ok(())
}

/// Reads rows `first_row..` into `out`; returns the index in `out` of the first value that is NaN or infinite.
/// Such a weight is not a number the model can compute with (every logit it reaches becomes NaN), so the
/// converter refuses it rather than write a file that only fails when a token happens to route through it.
fn read_rows_parallel(
    source: &TensorView<'_>,
    first_row: usize,
    row_len: usize,
    out: &mut [f32],
) -> Option<usize> {
    use rayon::prelude::*;
    let rows_per_task = (64 * 1024 / row_len.max(1)).max(1);
    let task_len = rows_per_task * row_len;
    out.par_chunks_mut(task_len)
        .enumerate()
        .filter_map(|(task, values)| {
            source.read_rows_f32(first_row + task * rows_per_task, values);
            first_non_finite(values).map(|at| task * task_len + at)
        })
        .min()
}

/// Where the first NaN or infinity of `values` is.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}

/// `general.name` from the snapshot folder: its own name, or for a Hugging Face cache snapshot
/// (`models--ORG--NAME/snapshots/HASH`) the repository name.
fn model_name(input: &Path) -> String {
    let dir = input.canonicalize().unwrap_or_else(|_| input.to_path_buf());
    let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = dir.parent();
    let cache_repo = parent
        .filter(|p| file_name(p).as_deref() == Some("snapshots"))
        .and_then(Path::parent)
        .and_then(file_name)
        .filter(|n| n.starts_with("models--"))
        .and_then(|n| n.rsplit("--").next().map(String::from));
    cache_repo
        .or_else(|| file_name(&dir))
        .unwrap_or_else(|| "model".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_type_names() {
        assert_eq!("Q4_0".parse::<TargetType>(), Ok(TargetType::Q4_0));
        assert_eq!(TargetType::Q8_0.to_string(), "q8_0");
        assert_eq!("Q4_K_M".parse::<TargetType>(), Ok(TargetType::Q4_K_M));
        assert_eq!(TargetType::Q6_K.to_string(), "q6_k");
        assert_eq!("IQ4_XS".parse::<TargetType>(), Ok(TargetType::IQ4_XS));
        assert_eq!(TargetType::IQ4_NL.to_string(), "iq4_nl");
        assert_eq!(TargetType::IQ4_NL.file_type(), 25);
        assert_eq!(TargetType::IQ4_XS.file_type(), 30);
        assert_eq!(TargetType::IQ4_XS.ggml_type(), GgmlType::IQ4_XS);
        // llama_model_ftype_name's words
        assert_eq!(crate::gguf::file_type_name(25), Some("IQ4_NL - 4.5 bpw"));
        assert_eq!(crate::gguf::file_type_name(30), Some("IQ4_XS - 4.25 bpw"));
        for t in TargetType::ALL {
            assert_eq!(t.name().parse::<TargetType>(), Ok(t));
            // What `bench` and ollama's /api/show print for the files Quarry writes.
            assert!(
                crate::gguf::file_type_name(t.file_type().into()).is_some(),
                "{t}: general.file_type {} has no name",
                t.file_type()
            );
        }
        assert!(
            "q5_k"
                .parse::<TargetType>()
                .unwrap_err()
                .contains("choose f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_nl or iq4_xs")
        );
    }

    #[test]
    fn model_names() {
        assert_eq!(model_name(Path::new("/x/granite-3.0-1b")), "granite-3.0-1b");
        assert_eq!(
            model_name(Path::new(
                "/c/models--ibm-granite--granite-3.1-1b-a400m-instruct/snapshots/abc123"
            )),
            "granite-3.1-1b-a400m-instruct"
        );
    }
}
