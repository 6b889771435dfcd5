//! Every row of the IQ4 test vectors (`tests/fixtures/iq4-vectors`, made with ggml's own C code, see its README):
//! our IQ4_NL and IQ4_XS quantizers must give llama-quantize's bytes, and our dequantizers the same f32 bits as
//! ggml's `dequantize_row_iq4_*`.

mod support;

use bytemuck::Zeroable;
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, dequantize_iq4_nl, dequantize_iq4_xs, quantize_iq4_nl, quantize_iq4_xs,
};
use support::ggml_vectors;

/// Rows in the manifest: the k-quant vectors' 22 rows and one FMA-sensitive row per format.
const ROWS: usize = 24;

fn vectors_dir() -> std::path::PathBuf {
    support::fixtures().join("iq4-vectors")
}

#[test]
fn iq4_nl_matches_ggml_on_every_row() {
    ggml_vectors::check_format::<BlockIQ4NL>(
        &vectors_dir(),
        ROWS,
        "iq4_nl",
        32,
        quantize_iq4_nl,
        dequantize_iq4_nl,
    );
}

#[test]
fn iq4_xs_matches_ggml_on_every_row() {
    ggml_vectors::check_format::<BlockIQ4XS>(
        &vectors_dir(),
        ROWS,
        "iq4_xs",
        256,
        quantize_iq4_xs,
        dequantize_iq4_xs,
    );
}

/// Weights from a damaged file can hold anything; the quantizers must not panic on NaN, infinities or extremes,
/// and the dequantizers not on arbitrary bytes.
#[test]
fn hostile_values_and_bytes_do_not_panic() {
    let mut next = ggml_vectors::xorshift(0x2545_F491_4F6C_DD1D);
    for round in 0..200 {
        let x = ggml_vectors::hostile_row(&mut next, round, 512);
        let mut nl = vec![BlockIQ4NL::zeroed(); 16];
        let mut xs = vec![BlockIQ4XS::zeroed(); 2];
        quantize_iq4_nl(&x, &mut nl);
        quantize_iq4_xs(&x, &mut xs);
        let mut out = vec![0.0f32; 512];
        dequantize_iq4_nl(&nl, &mut out);
        dequantize_iq4_xs(&xs, &mut out);
        let bytes: Vec<u8> = (0..136).map(|_| next() as u8).collect();
        dequantize_iq4_nl(
            &[bytemuck::pod_read_unaligned(&bytes[..18])],
            &mut out[..32],
        );
        dequantize_iq4_xs(&[bytemuck::pod_read_unaligned(&bytes)], &mut out[..256]);
    }
}

/// Finite weights come back within a fraction of their block's largest magnitude: a coarse check over inputs the
/// fixed rows do not cover. The least-squares scale may put the largest weight past the outermost level, so the
/// worst error is larger than half the widest gap between levels (24 of 127).
#[test]
fn round_trip_error_is_bounded_on_random_blocks() {
    let mut next = ggml_vectors::xorshift(0x9E37_79B9_7F4A_7C15);
    let mut worst_seen = [0.0f32; 2];
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
                / amax
        };
        let mut nl = [BlockIQ4NL::zeroed(); 8];
        quantize_iq4_nl(&x, &mut nl);
        dequantize_iq4_nl(&nl, &mut out);
        worst_seen[0] = worst_seen[0].max(worst(&out));
        let mut xs = [BlockIQ4XS::zeroed()];
        quantize_iq4_xs(&x, &mut xs);
        dequantize_iq4_xs(&xs, &mut out);
        worst_seen[1] = worst_seen[1].max(worst(&out));
    }
    // worst seen: 0.136 (IQ4_NL), 0.145 (IQ4_XS)
    assert!(worst_seen[0] <= 0.16, "IQ4_NL worst {}", worst_seen[0]);
    assert!(worst_seen[1] <= 0.16, "IQ4_XS worst {}", worst_seen[1]);
}
