//! Every row of the k-quant test vectors (`tests/fixtures/kquant-vectors`, made with ggml's own C code, see its
//! README): our Q4_K, Q5_K, Q6_K and Q8_K quantizers must give llama.cpp's bytes, and our dequantizers the same f32
//! bits as ggml's `dequantize_row_*`.

mod support;

use support::ggml_vectors;

use std::path::PathBuf;

use bytemuck::{Pod, Zeroable};
use quarry_quantize::blocks::{
    BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, dequantize_q4_k, dequantize_q5_k, dequantize_q6_k,
    dequantize_q8_k, quantize_q4_k, quantize_q5_k, quantize_q6_k, quantize_q8_k,
};

/// Rows in the manifest; a row removed by accident fails the count.
const ROWS: usize = 25;

fn vectors_dir() -> PathBuf {
    support::fixtures().join("kquant-vectors")
}

fn check_format<B: Pod + Zeroable>(
    ty: &str,
    quantize: fn(&[f32], &mut [B]),
    dequantize: fn(&[B], &mut [f32]),
) {
    ggml_vectors::check_format(&vectors_dir(), ROWS, ty, 256, quantize, dequantize);
}

#[test]
fn q4_k_matches_ggml_on_every_row() {
    check_format::<BlockQ4K>("q4_k", quantize_q4_k, dequantize_q4_k);
}

#[test]
fn q5_k_matches_ggml_on_every_row() {
    check_format::<BlockQ5K>("q5_k", quantize_q5_k, dequantize_q5_k);
}

#[test]
fn q6_k_matches_ggml_on_every_row() {
    check_format::<BlockQ6K>("q6_k", quantize_q6_k, dequantize_q6_k);
}

#[test]
fn q8_k_matches_ggml_on_every_row() {
    check_format::<BlockQ8K>("q8_k", quantize_q8_k, dequantize_q8_k);
}

/// Q8_K's group sums are what the k-quant dot products rely on: check them against the quants on every block.
#[test]
fn q8_k_group_sums_are_the_sums_of_the_quants() {
    let dir = vectors_dir();
    for row in ggml_vectors::rows(&dir) {
        let mut blocks = vec![BlockQ8K::zeroed(); row.input.len() / 256];
        quantize_q8_k(&row.input, &mut blocks);
        for (b, block) in blocks.iter().enumerate() {
            for (j, group) in block.qs.chunks_exact(16).enumerate() {
                let sum: i32 = group.iter().map(|&q| i32::from(q)).sum();
                assert_eq!(
                    i32::from(block.bsums[j]),
                    sum,
                    "{} block {b} group {j}",
                    row.name
                );
            }
        }
    }
}

/// Weights from a damaged file can hold anything: NaN, infinities, huge and subnormal values. The quantizers must
/// not panic on them (what they write is then as meaningless as the input), and the dequantizers must not panic
/// on arbitrary bytes.
#[test]
fn hostile_values_and_bytes_do_not_panic() {
    let mut next = ggml_vectors::xorshift(0x2545_F491_4F6C_DD1D);
    for round in 0..200 {
        let x = ggml_vectors::hostile_row(&mut next, round, 512);
        let mut q4 = vec![BlockQ4K::zeroed(); 2];
        let mut q5 = vec![BlockQ5K::zeroed(); 2];
        let mut q6 = vec![BlockQ6K::zeroed(); 2];
        let mut q8 = vec![BlockQ8K::zeroed(); 2];
        quantize_q4_k(&x, &mut q4);
        quantize_q5_k(&x, &mut q5);
        quantize_q6_k(&x, &mut q6);
        quantize_q8_k(&x, &mut q8);
        let mut out = vec![0.0f32; 512];
        dequantize_q4_k(&q4, &mut out);
        dequantize_q5_k(&q5, &mut out);
        dequantize_q6_k(&q6, &mut out);
        dequantize_q8_k(&q8, &mut out);
        // arbitrary bytes
        let bytes: Vec<u8> = (0..292 * 2).map(|_| next() as u8).collect();
        let any = |n: usize| bytes[..n].to_vec();
        dequantize_q4_k(&[bytemuck::pod_read_unaligned(&any(144))], &mut out[..256]);
        dequantize_q5_k(&[bytemuck::pod_read_unaligned(&any(176))], &mut out[..256]);
        dequantize_q6_k(&[bytemuck::pod_read_unaligned(&any(210))], &mut out[..256]);
        dequantize_q8_k(&[bytemuck::pod_read_unaligned(&any(292))], &mut out[..256]);
    }
}

/// Finite weights come back within a fraction of their block's largest magnitude: a coarse check over inputs the
/// fixed rows do not cover. Magnitudes stay where the f16 super-scales are normal numbers (below about 1e-3 they
/// turn subnormal and then zero, and the error grows as it does in ggml: see rows `tiny_*`).
#[test]
fn round_trip_error_is_bounded_on_random_blocks() {
    let mut next = ggml_vectors::xorshift(0x9E37_79B9_7F4A_7C15);
    for block in 0..2000 {
        let scale = 10f32.powi(block % 6 - 2);
        let x: Vec<f32> = (0..256)
            .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
            .collect();
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut out = vec![0.0f32; 256];
        let worst = |out: &[f32]| {
            x.iter()
                .zip(out)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
        };
        let mut q4 = [BlockQ4K::zeroed()];
        quantize_q4_k(&x, &mut q4);
        dequantize_q4_k(&q4, &mut out);
        assert!(worst(&out) <= 0.125 * amax, "Q4_K block {block}"); // worst seen 0.107
        let mut q5 = [BlockQ5K::zeroed()];
        quantize_q5_k(&x, &mut q5);
        dequantize_q5_k(&q5, &mut out);
        assert!(worst(&out) <= 0.08 * amax, "Q5_K block {block}"); // worst seen 0.068
        let mut q6 = [BlockQ6K::zeroed()];
        quantize_q6_k(&x, &mut q6);
        dequantize_q6_k(&q6, &mut out);
        assert!(worst(&out) <= 0.045 * amax, "Q6_K block {block}"); // worst seen 0.037
        let mut q8 = [BlockQ8K::zeroed()];
        quantize_q8_k(&x, &mut q8);
        dequantize_q8_k(&q8, &mut out);
        assert!(
            worst(&out) <= 0.5 / 127.0 * amax * 1.001,
            "Q8_K block {block}"
        );
    }
}
