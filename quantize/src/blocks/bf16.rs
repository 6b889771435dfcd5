//! bfloat16 rows: the dtype of most Hugging Face checkpoints (the upper half of an f32, so widening is exact).

/// Converts little-endian bf16 bytes to f32 (exact). Reads from bytes rather than casting to `&[bf16]` because a
/// mapped file gives no alignment guarantee.
///
/// Panics if `bytes.len() != out.len() * 2`.
pub fn bf16_le_bytes_to_f32(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * 2, "bf16 row: byte count mismatch");
    for (v, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *v = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widens_exactly() {
        let values = [1.0f32, -0.0, 3.140625, f32::MIN_POSITIVE];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let mut back = [0.0f32; 4];
        bf16_le_bytes_to_f32(&bytes, &mut back);
        assert_eq!(back.map(f32::to_bits), values.map(f32::to_bits));
    }
}
