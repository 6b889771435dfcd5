//! Matrix products over weights stored in ggml blocks, and the f32 operations around them.
//!
//! Each weight format has a module with a plain scalar reference; SIMD versions sit beside it and are chosen
//! once per process by CPU feature detection (or `QUARRY_KERNEL`). The model never sees which one runs: it
//! calls [`matmul`] with a [`WeightRows`] view and an [`ActivationBatch`].

pub mod float;
mod matmul;
pub mod ops;
mod portable;
pub mod q4_0;
pub mod q8_0;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{ActivationBatch, WeightRows, gemm_rows, matmul, supported, wants_q8_0};

use std::sync::OnceLock;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};

/// One set of kernels, all for the same instruction set.
///
/// The matrix kernels compute `out[r * n_tokens + t] = W[r] . A[t]` for a block of weight rows `W` (row-major,
/// `cols` weights each) and a block of activation rows `A` (one per token, contiguous): the row count is
/// `w.len() / blocks_per_row`, the token count `a.len() / blocks_per_row`. One call covers one thread's share
/// of a product, so implementations may tile rows and tokens however their registers suit.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    /// Activation row to Q8_0 (round half to even; SIMD versions must give the same bytes). Its quants are in
    /// -127..=127, which the Q8_0 product relies on (AVX2's sign trick would overflow on -128).
    pub quantize_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    pub gemm_q8_0: fn(w: &[BlockQ8_0], a: &[BlockQ8_0], blocks_per_row: usize, out: &mut [f32]),
    pub gemm_q4_0: fn(w: &[BlockQ4_0], a: &[BlockQ8_0], blocks_per_row: usize, out: &mut [f32]),
    pub gemm_f32: fn(w: &[f32], a: &[f32], cols: usize, out: &mut [f32]),
    pub gemm_f16: fn(w: &[f16], a: &[f32], cols: usize, out: &mut [f32]),
    pub gemm_bf16: fn(w: &[bf16], a: &[f32], cols: usize, out: &mut [f32]),
    /// Plain f32 dot product (attention scores).
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// `y += alpha * x` (the attention's weighted sum of values), rounded as `y[i] + alpha * x[i]` in every set.
    pub axpy_f32: fn(alpha: f32, x: &[f32], y: &mut [f32]),
}

pub const SCALAR: Kernels = Kernels {
    name: "scalar",
    quantize_q8_0: q8_0::quantize_activations_scalar,
    gemm_q8_0: q8_0::gemm_scalar,
    gemm_q4_0: q4_0::gemm_scalar,
    gemm_f32: float::gemm_f32_scalar,
    gemm_f16: float::gemm_f16_scalar,
    gemm_bf16: float::gemm_bf16_scalar,
    dot_f32: float::dot_f32_scalar,
    axpy_f32: float::axpy_f32_scalar,
};

/// Every kernel set this CPU can run, best last.
pub fn available() -> Vec<Kernels> {
    #[allow(unused_mut)]
    let mut all = vec![SCALAR, portable::SET];
    #[cfg(target_arch = "x86_64")]
    {
        if x86::avx2::detected() {
            all.push(x86::avx2::SET);
        }
        if x86::avx2::detected_vnni() {
            all.push(x86::avx2::SET_VNNI);
        }
        if x86::avx512::detected() {
            all.push(x86::avx512::SET);
        }
    }
    all
}

/// The kernel set for this process: `QUARRY_KERNEL=<name>` if set (and available), else the best available.
pub fn selected() -> &'static Kernels {
    static SELECTED: OnceLock<Kernels> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let all = available();
        let best = all[all.len() - 1];
        match std::env::var("QUARRY_KERNEL") {
            Ok(want) => match all.iter().find(|k| k.name == want) {
                Some(k) => *k,
                None => {
                    let names: Vec<_> = all.iter().map(|k| k.name).collect();
                    eprintln!(
                        "warning: QUARRY_KERNEL={want} is not available on this CPU (have: {}); using {}",
                        names.join(", "),
                        best.name
                    );
                    best
                }
            },
            Err(_) => best,
        }
    })
}
