//! The ggml weight formats, one module each, byte-for-byte as llama.cpp reads and writes them.
//!
//! Each quantized format has a `#[repr(C)]` block struct that is [`bytemuck::Pod`], so the runtime can view a
//! tensor's mapped bytes as `&[BlockQ8_0]` without copying, plus the reference quantizer (what the converter writes)
//! and the reference dequantizer (what optimised kernels are tested against). The plain float formats only need row
//! conversions.
//!
//! | format | weights | bytes | layout | quantizer |
//! |---|---:|---:|---|---|
//! | [`BlockQ8_0`] | 32 | 34 | f16 d, 32 x i8 | `quantize_row_q8_0_ref` |
//! | [`BlockQ4_0`] | 32 | 18 | f16 d, 16 bytes of nibbles | `quantize_row_q4_0_ref` |
//! | [`BlockQ4K`] | 256 | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles | `quantize_row_q4_K_ref` |
//! | [`BlockQ5K`] | 256 | 176 | as Q4_K plus 32 bytes of fifth bits | `quantize_row_q5_K_ref` |
//! | [`BlockQ6K`] | 256 | 210 | 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 x i8 scales, f16 d | `quantize_row_q6_K_ref` |
//! | [`BlockQ8K`] | 256 | 292 | f32 d, 256 x i8, 16 x i16 group sums (activations only) | `quantize_row_q8_K_ref` |
//! | [`BlockIQ4NL`] | 32 | 18 | f16 d, 16 bytes of nibbles indexing 16 non-linear levels | `quantize_iq4_nl` |
//! | [`BlockIQ4XS`] | 256 | 136 | f16 d, 8 x 6-bit scales (u16 high bits, 4 bytes low), 128 bytes of nibbles | `quantize_iq4_xs` |
//!
//! The k-quant quantizers (module `kquant` has their shared arithmetic) are the `_ref` functions llama-quantize
//! calls when it has no importance matrix, reproduced operation by operation: same f32 rounding at every step, no
//! fused multiply-adds, ggml's half-to-even `nearest_int`, first-wins tie breaks. `tests/kquant_vectors.rs` checks
//! them against bytes made by ggml's own C code.

pub mod bf16;
pub mod f16;
pub mod iq4;
mod kquant;
pub mod q4_0;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_k;

pub use iq4::{
    BlockIQ4NL, BlockIQ4XS, IQ4_VALUES, dequantize_iq4_nl, dequantize_iq4_xs, quantize_iq4_nl,
    quantize_iq4_xs,
};
pub use q4_0::{BlockQ4_0, dequantize_q4_0, quantize_q4_0};
pub use q4_k::{BlockQ4K, dequantize_q4_k, quantize_q4_k};
pub use q5_k::{BlockQ5K, dequantize_q5_k, quantize_q5_k};
pub use q6_k::{BlockQ6K, dequantize_q6_k, quantize_q6_k};
pub use q8_0::{BlockQ8_0, dequantize_q8_0, quantize_q8_0};
pub use q8_k::{BlockQ8K, dequantize_q8_k, quantize_q8_k};

/// Weights per block of both Q8_0 and Q4_0 (`QK8_0`, `QK4_0` in ggml): rows must be a multiple of it.
pub const BLOCK_LEN: usize = 32;

/// Weights per k-quant super-block (`QK_K` in ggml): rows of Q4_K, Q5_K, Q6_K and Q8_K must be a multiple of it.
pub const QK_K: usize = 256;

/// Panics with a message naming the format when a caller hands over mismatched buffers; the sizes come from the
/// caller's own shapes, never from file contents, so this is a programming error rather than bad input.
fn check_lengths(format: &str, values: usize, blocks: usize) {
    check_block_lengths(format, values, blocks, BLOCK_LEN);
}

fn check_block_lengths(format: &str, values: usize, blocks: usize, block_len: usize) {
    assert_eq!(
        values,
        blocks * block_len,
        "{format}: {values} values do not fill {blocks} blocks of {block_len}"
    );
}
