//! A Hugging Face checkpoint's weights: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`, memory-mapped and converted to f32 a slice of rows at a time.
//!
//! Headers are parsed and validated by the `safetensors` crate (checked offsets that must tile the data section
//! exactly, checked shape arithmetic, a 100 MB header cap); its bytemuck-based typed views are not used, because a
//! mapped file gives no alignment guarantee: rows are decoded from bytes instead.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::blocks::{bf16, f16};
use crate::error::ConvertError;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The element types a checkpoint tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    BF16,
    F16,
    F32,
}

impl SourceDtype {
    pub fn bytes(self) -> usize {
        match self {
            SourceDtype::BF16 | SourceDtype::F16 => 2,
            SourceDtype::F32 => 4,
        }
    }
}

/// One mapped safetensors file and its validated header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the data section starts (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// All the tensors of a checkpoint, by name, across its files.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    location: HashMap<String, usize>,
}

/// A tensor of the checkpoint: shape, dtype and its bytes in the mapped file.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    /// The file holding it, for error messages.
    pub file: &'a Path,
    pub dtype: SourceDtype,
    /// Torch order: the last dimension is contiguous.
    pub shape: &'a [usize],
    bytes: &'a [u8],
    map: &'a Mmap,
    /// Offset of `bytes` in `map`.
    offset: usize,
}

impl Checkpoint {
    /// Opens the weights in `dir`: the sharded layout when an index is present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint, ConvertError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Checkpoint::open_sharded(dir, &index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(ConvertError::MissingFile {
                path: single,
                hint: "the folder has neither model.safetensors nor model.safetensors.index.json: \
                       download the checkpoint's weights into it",
            });
        }
        Checkpoint::from_shards(vec![Shard::open(single)?])
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Checkpoint, ConvertError> {
        let text =
            std::fs::read_to_string(index_path).map_err(|e| ConvertError::read(index_path, e))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ConvertError::Json {
                path: index_path.to_path_buf(),
                source,
            })?;
        let corrupt = |problem: String| ConvertError::CorruptSafetensors {
            path: index_path.to_path_buf(),
            problem,
        };
        let Some(weight_map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(corrupt("it has no \"weight_map\" object".into()));
        };
        // tensor -> shard file name, and the shard names in a stable order
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let Some(shard) = shard.as_str() else {
                return Err(corrupt(format!(
                    "the shard of tensor '{tensor}' is not a file name"
                )));
            };
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == "." || shard == ".." {
                return Err(corrupt(format!(
                    "shard {shard:?} of tensor '{tensor}' is not a plain file name in the folder"
                )));
            }
            wanted.entry(shard).or_default().push(tensor);
        }
        if wanted.is_empty() {
            return Err(corrupt("its weight_map lists no tensors".into()));
        }
        let mut shards = Vec::with_capacity(wanted.len());
        for (shard_name, tensors) in &wanted {
            let path = dir.join(shard_name);
            if !path.is_file() {
                return Err(ConvertError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard_name.to_string(),
                });
            }
            let shard = Shard::open(path)?;
            if let Some(absent) = tensors.iter().find(|t| shard.metadata.info(t).is_none()) {
                return Err(ConvertError::CorruptSafetensors {
                    path: shard.path.clone(),
                    problem: format!(
                        "{INDEX_FILE} places tensor '{absent}' here, but the file does not hold it"
                    ),
                });
            }
            shards.push(shard);
        }
        Checkpoint::from_shards(shards)
    }

    fn from_shards(shards: Vec<Shard>) -> Result<Checkpoint, ConvertError> {
        let mut location = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.offset_keys() {
                if let Some(first) = location.insert(name.clone(), i) {
                    return Err(ConvertError::CorruptSafetensors {
                        path: shard.path.clone(),
                        problem: format!(
                            "tensor '{name}' is also in {}; a checkpoint holds each tensor once",
                            shards[first].path.display()
                        ),
                    });
                }
            }
        }
        Ok(Checkpoint { shards, location })
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The tensor `name`; an error names the file(s) when it is absent or of a dtype that cannot be converted.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, ConvertError> {
        let missing = || ConvertError::Checkpoint {
            path: self.describe_files(),
            problem: format!("the tensor '{name}' is missing"),
        };
        let (name, &i) = self.location.get_key_value(name).ok_or_else(missing)?;
        let shard = self.shards.get(i).ok_or_else(missing)?;
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        let dtype = match info.dtype {
            Dtype::BF16 => SourceDtype::BF16,
            Dtype::F16 => SourceDtype::F16,
            Dtype::F32 => SourceDtype::F32,
            other => {
                return Err(ConvertError::TensorDtype {
                    path: shard.path.clone(),
                    name: name.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        // The crate checked that the offsets tile the data section, which ends exactly at the end of the file.
        let (start, end) = info.data_offsets;
        let offset = shard.data_start + start;
        let bytes = shard
            .map
            .get(offset..shard.data_start + end)
            .ok_or_else(|| shard.corrupt(format!("tensor '{name}' lies outside the file")))?;
        Ok(TensorView {
            name,
            file: &shard.path,
            dtype,
            shape: &info.shape,
            bytes,
            map: &shard.map,
            offset,
        })
    }

    /// The file(s) an error about the whole checkpoint points to.
    fn describe_files(&self) -> PathBuf {
        match self.shards.as_slice() {
            [one] => one.path.clone(),
            shards => shards
                .first()
                .and_then(|s| s.path.parent())
                .map(|dir| dir.join(INDEX_FILE))
                .unwrap_or_default(),
        }
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Shard, ConvertError> {
        let file = File::open(&path).map_err(|e| ConvertError::read(&path, e))?;
        let len = file
            .metadata()
            .map_err(|e| ConvertError::read(&path, e))?
            .len();
        if len < 8 {
            return Err(ConvertError::CorruptSafetensors {
                path,
                problem: format!("it has {len} bytes, fewer than the 8-byte header length"),
            });
        }
        // SAFETY: the mapping is read-only. If another process truncated the file while we read it, reads past the
        // new end would fault; a checkpoint is not rewritten in place while it is being converted.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::read(&path, e))?;
        match SafeTensors::read_metadata(&map) {
            Ok((header_len, metadata)) => Ok(Shard {
                path,
                data_start: 8 + header_len,
                map,
                metadata,
            }),
            Err(e) => Err(ConvertError::CorruptSafetensors {
                problem: describe(&e, len),
                path,
            }),
        }
    }

    fn corrupt(&self, problem: String) -> ConvertError {
        ConvertError::CorruptSafetensors {
            path: self.path.clone(),
            problem,
        }
    }
}

/// The crate's error, said in terms of the file.
fn describe(e: &SafeTensorError, file_len: u64) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "it is too short to hold a header".into(),
        SafeTensorError::InvalidHeaderLength => {
            format!("its header length points past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::HeaderTooLarge => "its header length is over 100 MB".into(),
        SafeTensorError::InvalidHeader(_) => "its header is not UTF-8 text".into(),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("its header is not valid safetensors JSON ({e})")
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors its header declares do not add up to its {file_len} bytes (data cut short or extra bytes)"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor '{name}' has offsets that overlap or leave a gap")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte range does not match its shape and dtype".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape is too large to be real".into(),
        other => format!("its header is invalid ({other})"),
    }
}

impl std::fmt::Debug for TensorView<'_> {
    /// Leaves the data out: a tensor can be gigabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl TensorView<'_> {
    /// Elements per row: the last (contiguous) dimension; 1 for a scalar.
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows when the tensor is viewed as 2-D `[product of the leading dims, row_len]`.
    pub fn n_rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }

    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks the shape against what the config implies; the error names the tensor, its file and both shapes.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<(), ConvertError> {
        if self.shape == expected {
            return Ok(());
        }
        Err(ConvertError::Checkpoint {
            path: self.file.to_path_buf(),
            problem: format!(
                "tensor '{}' has shape {:?}, but config.json implies {expected:?}",
                self.name, self.shape
            ),
        })
    }

    /// Converts `out.len() / row_len` rows starting at `first_row` to f32 (exactly: every source dtype widens
    /// without rounding).
    ///
    /// Panics if `out` is not a whole number of rows or reaches past the last row: the caller's plan was made from
    /// this tensor's validated shape, so that would be a bug, not bad input.
    pub fn read_rows_f32(&self, first_row: usize, out: &mut [f32]) {
        let row_len = self.row_len();
        assert!(
            row_len > 0 && out.len().is_multiple_of(row_len),
            "{}: {} values are not whole rows of {row_len}",
            self.name,
            out.len()
        );
        let width = self.dtype.bytes();
        let start = first_row * row_len * width;
        let bytes = &self.bytes[start..start + out.len() * width];
        match self.dtype {
            SourceDtype::BF16 => bf16::bf16_le_bytes_to_f32(bytes, out),
            SourceDtype::F16 => f16::f16_le_bytes_to_f32(bytes, out),
            SourceDtype::F32 => {
                for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }

    /// Drops the mapped pages of rows already converted from this process's memory (the page cache keeps them;
    /// a later read faults them back in from the file). Without this every page of the checkpoint stays mapped
    /// until the end, and the converter's resident size grows to the checkpoint's size. Best effort.
    pub fn release_rows(&self, first_row: usize, n_rows: usize) {
        #[cfg(unix)]
        {
            let row_bytes = self.row_len() * self.dtype.bytes();
            let start = self.offset + first_row * row_bytes;
            let len =
                (n_rows * row_bytes).min(self.bytes.len().saturating_sub(first_row * row_bytes));
            // SAFETY: the map is a read-only shared mapping of a file nobody writes while we convert; dropping its
            // pages only makes the next access read the same bytes from the file again, so no reference into it
            // can observe a change. The range lies inside the map (checked by `get` when the view was made).
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (first_row, n_rows);
    }

    /// The whole tensor in f32. Meant for small tensors (norms, routers) and tests; the converter streams large
    /// ones with [`TensorView::read_rows_f32`].
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n_elements()];
        if !out.is_empty() {
            self.read_rows_f32(0, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with the given (name, dtype, shape, bytes) entries, in order.
    fn file(entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in entries {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
            data.extend_from_slice(bytes);
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<Checkpoint, ConvertError>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SINGLE_FILE), bytes).unwrap();
        let checkpoint = Checkpoint::open(dir.path());
        (dir, checkpoint)
    }

    #[test]
    fn reads_every_dtype_as_f32_rows() {
        let bf16: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let f16: Vec<u8> = [3.0f32, 0.5]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bytes = file(&[
            ("a", "BF16", &[2, 2], bf16),
            ("b", "F16", &[2], f16),
            ("c", "F32", &[3, 1], f32_bytes(&[1.0, 2.0, 3.0])),
        ]);
        let (_dir, checkpoint) = open_bytes(&bytes);
        let checkpoint = checkpoint.unwrap();
        assert_eq!(checkpoint.tensor_names(), vec!["a", "b", "c"]);
        let a = checkpoint.tensor("a").unwrap();
        assert_eq!((a.n_rows(), a.row_len()), (2, 2));
        let mut row = [0.0f32; 2];
        a.read_rows_f32(1, &mut row);
        assert_eq!(row, [0.25, 8.0]);
        assert_eq!(checkpoint.tensor("b").unwrap().to_f32_vec(), vec![3.0, 0.5]);
        assert_eq!(
            checkpoint.tensor("c").unwrap().to_f32_vec(),
            vec![1.0, 2.0, 3.0]
        );
        let err = checkpoint
            .tensor("c")
            .unwrap()
            .expect_shape(&[3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'c' has shape [3, 1], but config.json implies [3]"),
            "{err}"
        );
        let err = checkpoint.tensor("zz").unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors: the tensor 'zz' is missing"),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_and_corruption_is_a_named_error() {
        let good = file(&[("w", "F32", &[2, 4], f32_bytes(&[0.0; 8]))]);
        for len in 0..good.len() {
            let (_dir, result) = open_bytes(&good[..len]);
            let err = result
                .err()
                .unwrap_or_else(|| panic!("length {len} accepted"))
                .to_string();
            assert!(
                err.contains("model.safetensors: ") && err.contains("truncated or corrupt"),
                "{len}: {err}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        let (_dir, result) = open_bytes(&long);
        assert!(result.err().unwrap().to_string().contains("do not add up"));
        let mut bad_json = good.clone();
        bad_json[8] = b'[';
        let (_dir, result) = open_bytes(&bad_json);
        assert!(
            result
                .err()
                .unwrap()
                .to_string()
                .contains("not valid safetensors JSON")
        );
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let (_dir, result) = open_bytes(&huge);
        assert!(result.err().is_some());
    }

    #[test]
    fn refuses_other_dtypes_by_name() {
        let (_dir, checkpoint) = open_bytes(&file(&[("ids", "I64", &[2], vec![0; 16])]));
        let err = checkpoint.unwrap().tensor("ids").err().unwrap().to_string();
        assert!(
            err.contains("tensor 'ids' is I64; only BF16, F16 and F32"),
            "{err}"
        );
    }

    #[test]
    fn shards_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s1.safetensors"),
            file(&[("a", "F32", &[1], f32_bytes(&[1.0]))]),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("s2.safetensors"),
            file(&[("b", "F32", &[1], f32_bytes(&[2.0]))]),
        )
        .unwrap();
        let index = |map: &str| {
            std::fs::write(
                dir.path().join(INDEX_FILE),
                format!("{{\"weight_map\": {map}}}"),
            )
            .unwrap()
        };
        index(r#"{"a": "s1.safetensors", "b": "s2.safetensors"}"#);
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.tensor("b").unwrap().to_f32_vec(), vec![2.0]);

        index(r#"{"a": "s1.safetensors", "b": "s3.safetensors"}"#);
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(INDEX_FILE)
                && err.contains("names shard s3.safetensors, which is missing"),
            "{err}"
        );
        index(r#"{"a": "s1.safetensors", "b": "s1.safetensors"}"#);
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("s1.safetensors: model.safetensors.index.json places tensor 'b' here"),
            "{err}"
        );
        index(r#"{"a": "../s1.safetensors"}"#);
        assert!(
            Checkpoint::open(dir.path())
                .err()
                .unwrap()
                .to_string()
                .contains("not a plain file name")
        );
        index(r#"{"a": "s1.safetensors", "b": "s2.safetensors"}"#);
        std::fs::write(
            dir.path().join("s2.safetensors"),
            file(&[
                ("a", "F32", &[1], f32_bytes(&[1.0])),
                ("b", "F32", &[1], f32_bytes(&[2.0])),
            ]),
        )
        .unwrap();
        assert!(
            Checkpoint::open(dir.path())
                .err()
                .unwrap()
                .to_string()
                .contains("'a' is also in")
        );
    }

    #[test]
    fn missing_weights_say_what_to_download() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors: missing") && err.contains("download"),
            "{err}"
        );
    }
}
