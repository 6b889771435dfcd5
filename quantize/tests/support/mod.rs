//! Shared helpers of the converter's integration tests: fixture paths and a minimal `.npy` reader.
#![allow(dead_code)] // each test binary uses a different subset

// The skip rule of both test crates (SKIPPED on a developer's machine, a failure in CI), kept with the runtime's.
#[path = "../../../tests/support/skip.rs"]
mod skip;

pub mod ggml_vectors;

use std::path::{Path, PathBuf};

/// The project's own fixtures (`tests/fixtures` at the repository root), present in every clone.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `../shared/fixtures` beside the project, which holds fixtures too large or not licensed to commit.
/// `None` when it is absent, after saying what is skipped (a failure in CI: see `skip.rs`).
pub fn shared_fixtures(what: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    if dir.is_dir() {
        Some(dir)
    } else {
        skip::skipped(what, &dir);
        None
    }
}

/// A float32 `.npy` array: its shape and values in C order.
pub struct Npy {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Reads a little-endian float32, C-order `.npy` file (format versions 1 to 3), the only kind the fixtures hold.
pub fn read_npy_f32(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_npy_f32(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn parse_npy_f32(bytes: &[u8]) -> Result<Npy, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let data_start = header_start + header_len;
    let header = std::str::from_utf8(bytes.get(header_start..data_start).ok_or("short header")?)
        .map_err(|e| e.to_string())?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or(format!("no {key} in {header}"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    if !field("descr")?.starts_with("'<f4'") {
        return Err(format!("not little-endian float32: {header}"));
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err(format!("Fortran order: {header}"));
    }
    let shape_text = field("shape")?;
    let inner = &shape_text[1..shape_text.find(')').ok_or("unterminated shape")?];
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| format!("shape {inner}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[data_start..];
    if data.len() != count * 4 {
        return Err(format!("{} data bytes for shape {shape:?}", data.len()));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Npy { shape, values })
}

/// One tensor of a safetensors file, raw: (name, dtype, shape, bytes).
pub type RawTensor = (String, String, Vec<usize>, Vec<u8>);

/// Reads every tensor of a safetensors file, in data order. Written here, independently of the converter's
/// reader, so the tests do not check the converter against itself.
pub fn read_safetensors(path: &Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut tensors: Vec<(usize, RawTensor)> = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, info)| {
            let offsets: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
            let dtype = info["dtype"].as_str().unwrap().to_string();
            (
                offsets[0],
                (
                    name.clone(),
                    dtype,
                    shape,
                    data[offsets[0]..offsets[1]].to_vec(),
                ),
            )
        })
        .collect();
    tensors.sort_by_key(|(offset, _)| *offset);
    tensors.into_iter().map(|(_, t)| t).collect()
}

/// Writes a safetensors file holding `tensors` in order.
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// A raw tensor's values in f32 (BF16, F16 or F32 data).
pub fn raw_to_f32(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u32::from(u16::from_le_bytes([b[0], b[1]]))) << 16))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("dtype {other}"),
    }
}

/// Copies the files of a fixture folder into a fresh temporary folder that a test may change.
pub fn copy_fixture(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// Every file left in a folder, for "nothing was written" checks.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
