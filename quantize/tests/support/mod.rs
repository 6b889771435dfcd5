//! Shared helpers of the converter's integration tests: fixture paths and a minimal `.npy` reader.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// The project's own fixtures (`tests/fixtures` at the repository root), present in every clone.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `../shared/fixtures` beside the project, which holds fixtures too large or not licensed to commit.
/// `None` (and a note on stderr saying what is skipped) when it is absent.
pub fn shared_fixtures(what: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED {what}: {} is absent", dir.display());
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
