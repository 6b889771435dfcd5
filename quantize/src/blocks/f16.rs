//! IEEE binary16 rows: what F16 tensors hold, and one of the dtypes a safetensors checkpoint may use.

use half::f16;

/// Appends `values` rounded to f16 (round to nearest even, as ggml's `GGML_FP32_TO_FP16` and numpy's `astype`)
/// as little-endian bytes.
pub fn extend_f16_le_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 2);
    for &v in values {
        out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

/// Converts little-endian f16 bytes to f32 (exact). Reads from bytes rather than casting to `&[f16]` because a
/// mapped file gives no alignment guarantee.
///
/// Panics if `bytes.len() != out.len() * 2`.
pub fn f16_le_bytes_to_f32(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * 2, "f16 row: byte count mismatch");
    for (v, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *v = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rounding() {
        let mut bytes = Vec::new();
        // 1 + 2^-11 is halfway between two f16 values: ties to the even one (1.0).
        extend_f16_le_bytes(&[1.5, -2.0, 1.0 + f32::powi(2.0, -11), 70000.0], &mut bytes);
        let mut back = [0.0f32; 4];
        f16_le_bytes_to_f32(&bytes, &mut back);
        assert_eq!(back, [1.5, -2.0, 1.0, f32::INFINITY]);
    }
}
