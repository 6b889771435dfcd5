//! Rows of a GGUF tensor back to f32, for requantizing: the float types exactly, the block types Quarry writes
//! through their reference dequantizers.

use bytemuck::Pod;
use rayon::prelude::*;

use crate::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, bf16,
    dequantize_iq4_nl, dequantize_iq4_xs, dequantize_q4_0, dequantize_q4_k, dequantize_q5_k,
    dequantize_q6_k, dequantize_q8_0, f16,
};
use crate::gguf::GgmlType;

/// Whether [`decode_rows`] reads tensors of type `ty`.
pub fn can_decode(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
    )
}

/// Decodes `bytes`, whole rows of `row_len` values of type `ty` (one [`can_decode`] accepts), into `out`, in
/// parallel on the rayon pool.
///
/// Panics if `bytes` and `out` do not hold the same whole rows; the caller sizes both from a checked tensor header.
pub fn decode_rows(ty: GgmlType, bytes: &[u8], row_len: usize, out: &mut [f32]) {
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(0);
    assert!(
        row_len > 0 && row_bytes > 0 && out.len().is_multiple_of(row_len),
        "{ty}: rows of {row_len} cannot be decoded"
    );
    assert_eq!(
        bytes.len() / row_bytes,
        out.len() / row_len,
        "{ty}: row count"
    );
    let rows_per_task = (16 * 1024 / row_len).max(1);
    bytes
        .par_chunks(rows_per_task * row_bytes)
        .zip(out.par_chunks_mut(rows_per_task * row_len))
        .for_each(|(bytes, out)| decode_values(ty, bytes, out));
}

/// Decodes `bytes`, whole blocks of type `ty` (one [`can_decode`] accepts), into the `out` values they hold, on
/// this thread: also how the runtime reads a row of the token embedding.
///
/// Panics if `bytes` and `out` do not hold the same whole blocks.
pub fn decode_values(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        ty.row_bytes(out.len() as u64),
        Some(bytes.len() as u64),
        "{ty}: {} bytes do not hold {} values",
        bytes.len(),
        out.len()
    );
    match ty {
        GgmlType::F32 => {
            for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => f16::f16_le_bytes_to_f32(bytes, out),
        GgmlType::BF16 => bf16::bf16_le_bytes_to_f32(bytes, out),
        GgmlType::Q8_0 => dequantize_blocks::<BlockQ8_0>(bytes, out, 32, dequantize_q8_0),
        GgmlType::Q4_0 => dequantize_blocks::<BlockQ4_0>(bytes, out, 32, dequantize_q4_0),
        GgmlType::Q4_K => dequantize_blocks::<BlockQ4K>(bytes, out, 256, dequantize_q4_k),
        GgmlType::Q5_K => dequantize_blocks::<BlockQ5K>(bytes, out, 256, dequantize_q5_k),
        GgmlType::Q6_K => dequantize_blocks::<BlockQ6K>(bytes, out, 256, dequantize_q6_k),
        GgmlType::IQ4_NL => dequantize_blocks::<BlockIQ4NL>(bytes, out, 32, dequantize_iq4_nl),
        GgmlType::IQ4_XS => dequantize_blocks::<BlockIQ4XS>(bytes, out, 256, dequantize_iq4_xs),
        other => unreachable!("can_decode rejects {other}"),
    }
}

/// Block by block: a mapped file gives no alignment guarantee, so each block is copied out before use.
fn dequantize_blocks<B: Pod>(
    bytes: &[u8],
    out: &mut [f32],
    block_len: usize,
    dequantize: fn(&[B], &mut [f32]),
) {
    for (raw, values) in bytes
        .chunks_exact(std::mem::size_of::<B>())
        .zip(out.chunks_exact_mut(block_len))
    {
        let block: B = bytemuck::pod_read_unaligned(raw);
        dequantize(std::slice::from_ref(&block), values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::encode::RowEncoder;

    #[test]
    fn decodes_what_the_encoder_wrote() {
        let values: Vec<f32> = (0..1024)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ] {
            assert!(can_decode(ty));
            let bytes = RowEncoder::new(ty).encode(&values, 512).to_vec();
            let mut back = vec![0.0; 1024];
            decode_rows(ty, &bytes, 512, &mut back);
            if ty == GgmlType::F32 {
                assert_eq!(back, values);
            }
            if ty == GgmlType::F16 {
                let rounded: Vec<f32> = values
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect();
                assert_eq!(back, rounded);
            }
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            // Q4_0's coarsest: a step of max/8, and the negated maximum clamped a whole step (50/7/8 = 0.89)
            assert!(worst <= 0.9, "{ty}: {worst}");
        }
        // the IQ4 types exactly as their reference dequantizers
        let mut xs = vec![bytemuck::Zeroable::zeroed(); 4];
        crate::blocks::quantize_iq4_xs(&values, &mut xs);
        let mut want = vec![0.0; 1024];
        dequantize_iq4_xs(&xs, &mut want);
        let mut back = vec![0.0; 1024];
        decode_rows(GgmlType::IQ4_XS, bytemuck::cast_slice(&xs), 256, &mut back);
        assert_eq!(back, want);
        let mut nl = vec![bytemuck::Zeroable::zeroed(); 32];
        crate::blocks::quantize_iq4_nl(&values, &mut nl);
        dequantize_iq4_nl(&nl, &mut want);
        decode_values(GgmlType::IQ4_NL, bytemuck::cast_slice(&nl), &mut back);
        assert_eq!(back, want);
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let mut back = vec![0.0; 1024];
        decode_rows(GgmlType::BF16, &bf16, 256, &mut back);
        assert_eq!(back[3], f32::from_bits(values[3].to_bits() & 0xFFFF_0000));
        assert!(!can_decode(GgmlType::Q4_1));
    }
}
