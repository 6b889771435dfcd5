//! The ggml weight formats, one module each, byte-for-byte as llama.cpp reads and writes them.
//!
//! Each quantized format has a `#[repr(C)]` block struct that is [`bytemuck::Pod`], so the runtime can view a
//! tensor's mapped bytes as `&[BlockQ8_0]` without copying, plus the reference quantizer (what the converter writes)
//! and the reference dequantizer (what optimised kernels are tested against). The plain float formats only need row
//! conversions.

pub mod bf16;
pub mod f16;
pub mod q4_0;
pub mod q8_0;

pub use q4_0::{BlockQ4_0, dequantize_q4_0, quantize_q4_0};
pub use q8_0::{BlockQ8_0, dequantize_q8_0, quantize_q8_0};

/// Weights per block of both Q8_0 and Q4_0 (`QK8_0`, `QK4_0` in ggml): rows must be a multiple of it.
pub const BLOCK_LEN: usize = 32;

/// Panics with a message naming the format when a caller hands over mismatched buffers; the sizes come from the
/// caller's own shapes, never from file contents, so this is a programming error rather than bad input.
fn check_lengths(format: &str, values: usize, blocks: usize) {
    assert_eq!(
        values,
        blocks * BLOCK_LEN,
        "{format}: {values} values do not fill {blocks} blocks of {BLOCK_LEN}"
    );
}
