//! A GGUF file -> the same model at another type, with the converter's type recipe: what `llama-quantize` does.
//!
//! The input's metadata is carried over unchanged except `general.file_type` (the new type),
//! `general.quantization_version`, `general.name` when asked, and keys that no longer hold (split-file keys, an
//! alignment other than the writer's 32). Tensors keep their order, names and shapes; each one's type comes from
//! [`Recipe`] by its GGUF name, exactly as for a converted checkpoint, so requantizing an F32 conversion gives the
//! same file as converting straight to the target.
//!
//! Like the converter, everything is checked before a byte is written (architecture, keys the recipe needs, every
//! tensor's type), then each tensor is streamed: a chunk of rows is decoded to f32, encoded and written to
//! `OUT.part`, and the input pages just read are dropped from memory. A tensor that already has its target type is
//! copied as is. Input tensors that are already quantized to another type are refused unless
//! `allow_requantize` is set (then they are dequantized first and listed in the report), as llama-quantize does.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::Mmap;

use super::decode::{can_decode, decode_rows};
use super::encode::RowEncoder;
use super::output::{TensorSink, write_gguf};
use super::plan::{PlannedTensor, Recipe, gqa, role_of_gguf_tensor};
use super::{CHUNK_VALUES, ConvertReport, QUANTIZATION_VERSION, TargetType, on_pool};
use crate::architecture::Architecture;
use crate::error::ConvertError;
use crate::gguf::{DEFAULT_ALIGNMENT, GgmlType, GgufFile, TensorInfo, Value};

/// What to requantize, into what.
#[derive(Clone, Debug)]
pub struct RequantizeOptions {
    /// The GGUF file to read.
    pub input: PathBuf,
    /// The GGUF file to write (replaced only once the new one is complete; may be the input itself).
    pub output: PathBuf,
    pub target: TargetType,
    /// As [`ConvertOptions::embedding_type`](super::ConvertOptions::embedding_type).
    pub embedding_type: Option<TargetType>,
    /// Dequantize input tensors that are already quantized (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)
    /// instead of refusing the file. Tensors that already have the type the recipe picks are copied either way.
    pub allow_requantize: bool,
    /// A new `general.name`; `None` keeps the input's.
    pub model_name: Option<String>,
    /// Draw a progress bar on stderr; indicatif hides it when stderr is not a terminal.
    pub progress: bool,
    /// Worker threads; `None` uses rayon's global pool (one per core).
    pub threads: Option<usize>,
}

impl RequantizeOptions {
    pub fn new(
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
        target: TargetType,
    ) -> RequantizeOptions {
        RequantizeOptions {
            input: input.into(),
            output: output.into(),
            target,
            embedding_type: None,
            allow_requantize: false,
            model_name: None,
            progress: false,
            threads: None,
        }
    }
}

/// Requantizes the GGUF file `opts.input` into `opts.output`.
pub fn requantize(opts: &RequantizeOptions) -> Result<ConvertReport, ConvertError> {
    on_pool(opts.threads, || requantize_on_current_pool(opts))
}

fn requantize_on_current_pool(opts: &RequantizeOptions) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let input = GgufFile::open(&opts.input)?;
    let bad = |problem: String| ConvertError::GgufInput {
        path: opts.input.clone(),
        problem,
    };
    let arch_name = input
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("general.architecture is missing; it is not a model file".into()))?;
    let architecture = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            bad(format!(
                "architecture {arch_name} is not supported; quarry requantizes granite and granitemoe files"
            ))
        })?;
    if let Some(count) = input.get("split.count").and_then(Value::as_u64)
        && count > 1
    {
        return Err(bad(format!(
            "this is one part of a model split into {count} files; merge them first \
             (llama-gguf-split --merge FIRST-PART OUT.gguf) and requantize the merged file"
        )));
    }
    let count_key = |suffix: &str| -> Result<Option<usize>, ConvertError> {
        let key = format!("{arch_name}.{suffix}");
        match input.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(format!("{key} is {}, not a count", v.summary()))),
        }
    };
    let n_layers = count_key("block_count")?
        .ok_or_else(|| bad(format!("{arch_name}.block_count is missing")))?;
    // llama.cpp's loader requires head_count; head_count_kv defaults to it (no grouping).
    let n_head = count_key("attention.head_count")?
        .ok_or_else(|| bad(format!("{arch_name}.attention.head_count is missing")))?;
    let n_head_kv = count_key("attention.head_count_kv")?.unwrap_or(n_head);
    let recipe = Recipe {
        target: opts.target,
        embedding_type: opts.embedding_type,
        n_layers,
        n_experts: count_key("expert_count")?.unwrap_or(0),
        n_gqa: gqa(n_head, n_head_kv),
    };

    let has_output = input.tensor("output.weight").is_some();
    let mut tensors = Vec::with_capacity(input.tensors().len());
    let mut dequantized = Vec::new();
    for info in input.tensors() {
        let planned = plan_tensor(info, &recipe, has_output);
        if info.ty != planned.ty {
            if !can_decode(info.ty) {
                return Err(bad(format!(
                    "tensor '{}' is {}, which quarry cannot read; requantize the F16, BF16 or F32 file",
                    info.name, info.ty
                )));
            }
            if !matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                if !opts.allow_requantize {
                    return Err(ConvertError::AlreadyQuantized {
                        path: opts.input.clone(),
                        tensor: info.name.clone(),
                        ty: info.ty,
                    });
                }
                dequantized.push((info.name.clone(), info.ty));
            }
        }
        tensors.push(planned);
    }
    let metadata = carried_metadata(&input, opts);

    // Tensor data is read through a map of our own, whose pages can be dropped as they are consumed: the file may
    // be many GB and the reader's map must not grow the process to that size.
    let file = File::open(&opts.input).map_err(|e| ConvertError::read(&opts.input, e))?;
    // SAFETY: a read-only shared mapping of a file nobody is expected to modify while it is requantized (the same
    // assumption the GGUF reader makes); every range read is checked against the map's length first.
    let data = unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::read(&opts.input, e))?;
    let file_bytes = write_gguf(
        &opts.output,
        metadata,
        &tensors,
        opts.progress,
        |tensor, sink| {
            let info = input
                .tensor(&tensor.name)
                .ok_or_else(|| bad(format!("tensor '{}' vanished", tensor.name)))?;
            write_tensor(sink, &data, info, tensor, &opts.input)
        },
    )?;
    Ok(ConvertReport {
        dequantized,
        ..ConvertReport::from_plan(
            &opts.output,
            architecture,
            opts.target,
            tensors,
            file_bytes,
            started,
        )
    })
}

/// The output tensor for input tensor `info`: same name and shape, the recipe's type for its role.
fn plan_tensor(info: &TensorInfo, recipe: &Recipe, has_output: bool) -> PlannedTensor {
    let role = role_of_gguf_tensor(&info.name, info.dims.len(), has_output);
    let row_len = info.dims.first().map_or(1, |&d| d as usize);
    let (ty, fell_back_from) = recipe.choose(&info.name, role, row_len);
    let rows = (info.n_elements() / (row_len.max(1) as u64)) as usize;
    PlannedTensor {
        name: info.name.clone(),
        source: info.name.clone(),
        source_shape: info.dims.iter().rev().map(|&d| d as usize).collect(),
        role,
        dims: info.dims.clone(),
        ty,
        fell_back_from,
        source_rows: std::iter::once(0..rows).collect(),
        rope_head_dim: None,
    }
}

/// The input's key-values with the new file type and quantization version (updated in place, so a requantized
/// conversion has the converter's key order), a new name if asked, and without keys that would be false.
fn carried_metadata(input: &GgufFile, opts: &RequantizeOptions) -> Vec<(String, Value)> {
    let mut metadata: Vec<(String, Value)> = input
        .metadata()
        .iter()
        .filter(|(key, value)| {
            let split_key = key.starts_with("split.");
            let other_alignment =
                key == "general.alignment" && value.as_u64() != Some(DEFAULT_ALIGNMENT);
            !split_key && !other_alignment
        })
        .cloned()
        .collect();
    let mut set = |key: &str, value: Value| match metadata.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value,
        None => metadata.push((key.to_string(), value)),
    };
    set("general.file_type", Value::U32(opts.target.file_type()));
    set(
        "general.quantization_version",
        Value::U32(QUANTIZATION_VERSION),
    );
    if let Some(name) = &opts.model_name {
        set("general.name", Value::String(name.clone()));
    }
    metadata
}

/// Streams one tensor: its input bytes a chunk of rows at a time, copied when the type is unchanged, else decoded
/// to f32 and encoded to the new type.
fn write_tensor(
    sink: &mut TensorSink<'_>,
    data: &Mmap,
    info: &TensorInfo,
    tensor: &PlannedTensor,
    path: &Path,
) -> Result<(), ConvertError> {
    let corrupt = |problem: &str| ConvertError::GgufInput {
        path: path.to_path_buf(),
        problem: format!("tensor '{}': {problem}", info.name),
    };
    let row_len = tensor.row_len();
    let row_bytes = info
        .ty
        .row_bytes(row_len as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| corrupt("rows are not whole blocks of its type"))?;
    let start = usize::try_from(info.offset).map_err(|_| corrupt("offset too large"))?;
    let size = usize::try_from(info.size).map_err(|_| corrupt("size too large"))?;
    let bytes = start
        .checked_add(size)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| {
            corrupt("data lies past the end of the file (was it changed while being read?)")
        })?;
    if row_len == 0 || row_bytes == 0 || bytes.is_empty() {
        return sink.write(&[], 0);
    }
    let rows_per_chunk = (CHUNK_VALUES / row_len).max(1);
    let mut values = Vec::new();
    let mut encoder = RowEncoder::new(tensor.ty);
    for (i, chunk) in bytes.chunks(rows_per_chunk * row_bytes).enumerate() {
        let n_values = chunk.len() / row_bytes * row_len;
        if info.ty == tensor.ty {
            sink.write(chunk, n_values as u64)?;
        } else {
            values.resize(n_values, 0.0);
            decode_rows(info.ty, chunk, row_len, &mut values);
            if let Some(at) = super::first_non_finite(&values) {
                return Err(ConvertError::NonFinite {
                    path: path.to_path_buf(),
                    tensor: info.name.clone(),
                    row: i * rows_per_chunk + at / row_len,
                    value: values[at],
                });
            }
            sink.write(encoder.encode(&values, row_len), n_values as u64)?;
        }
        release(data, start + i * rows_per_chunk * row_bytes, chunk.len());
    }
    Ok(())
}

/// Drops the mapped input pages just consumed from this process (the page cache keeps them). Best effort.
fn release(data: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the map is read-only and shared; dropping its pages only makes a later access read the same
        // bytes from the file again, so no reference into it can observe a change. The range lies inside the map
        // (it was sliced from it).
        let _ =
            unsafe { data.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
    #[cfg(not(unix))]
    let _ = (data, start, len);
}
