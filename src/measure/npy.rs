//! NumPy `.npy` files of little-endian f32 in C order: how `quarry logits` hands logits to other tools, and how
//! tests read the reference logits.

use std::io::{self, Read, Write};

/// Writes `data` with the given shape as a version 1.0 `.npy` file.
pub fn write_f32(mut out: impl Write, shape: &[usize], data: &[f32]) -> io::Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape does not match the data"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64, newline last.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    out.write_all(&bytes)
}

/// Reads a little-endian f32 C-order `.npy` file: `(shape, values)`.
pub fn read_f32(mut input: impl Read) -> io::Result<(Vec<usize>, Vec<f32>)> {
    let bad = |msg: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a float32 .npy file: {msg}"),
        )
    };
    let mut data = Vec::new();
    input.read_to_end(&mut data)?;
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let (hlen, start) = match data[6] {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10),
        2 | 3 if data.len() >= 12 => (
            u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown version")),
    };
    let header = data
        .get(start..start + hlen)
        .ok_or_else(|| bad("truncated header"))?;
    let header = String::from_utf8_lossy(header);
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("dtype must be '<f4' in C order"));
    }
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let body = &data[start + hlen..];
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if body.len() != count * 4 {
        return Err(bad("data length does not match the shape"));
    }
    let values = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut buf = Vec::new();
        super::write_f32(&mut buf, &[3, 4], &data).unwrap();
        assert_eq!((10 + u16::from_le_bytes([buf[8], buf[9]]) as usize) % 64, 0);
        let (shape, back) = super::read_f32(&buf[..]).unwrap();
        assert_eq!(shape, vec![3, 4]);
        assert_eq!(back, data);
    }
}
