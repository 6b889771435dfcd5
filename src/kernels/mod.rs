//! Matrix products over weights stored in ggml blocks, and the f32 operations around them.
//!
//! Each weight format has a module with a plain scalar reference (`q8_0`, `q4_0`, `q4_k`, `q5_k`, `q6_k`,
//! `float`); the SIMD sets sit beside them, one module per instruction set, and one set is chosen once per
//! process by CPU feature detection (or `QUARRY_KERNEL`). The model never sees which one runs: it hands
//! [`WeightRows`] views and [`ActivationBatch`]es to [`parallel::parallel_gemm`].
//!
//! The sets, from slowest to fastest:
//! - `scalar`: the references everything is tested against.
//! - `portable` (`portable.rs`): the `wide` crate, SIMD width chosen at compile time (SSE2 / NEON); integer
//!   block sums widened to i16. Runs everywhere.
//! - `avx2` (`x86/avx2.rs`): AVX2 + FMA + F16C, byte dots with `vpmaddubsw` + `vpmaddwd`.
//! - `avxvnni` (same file): the 256-bit `vpdpbusd` of CPUs with AVX-VNNI but no AVX-512.
//! - `avx512vnni` (`x86/avx512.rs`): AVX-512 F/BW/VL + VNNI, `vpdpbusd` on 512 bits.
//!
//! The x86 sets share their loop structure (`x86/mod.rs`): per-block dots for few tokens, one lane per token for
//! many. The shape of a call decides which runs, so callers need not care.

pub mod float;
mod matmul;
pub mod ops;
pub mod parallel;
mod portable;
pub mod q4_0;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{
    ActivationBatch, ActivationRows, WeightRows, gemm_rows, supported, wants_q8_0, wants_q8_k,
};

use std::sync::OnceLock;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};

/// One set of kernels, all for the same instruction set.
///
/// The matrix kernels compute `out[t * ldo + r] = W[r] . A[t]` for a block of weight rows `W` (row-major,
/// `cols` weights each) and a block of activation rows `A` (one per token, contiguous): the row count is
/// `w.len() / blocks_per_row`, the token count `a.len() / blocks_per_row`. The output is token-major, the layout
/// everything after a product reads: token `t`'s results are `out[t * ldo..t * ldo + rows]`, and `ldo >= rows`
/// lets a call fill a column range of a wider token-major matrix. Only those positions are written; `out` must
/// hold at least `(n_tokens - 1) * ldo + rows` values (see [`check_out`]). One call covers one thread's share
/// of a product, so implementations may tile rows and tokens however their registers suit.
///
/// Every set computes each 32-block's integer dot exactly; the float sums over blocks (and over f32/f16/bf16
/// products) may be associated differently from the scalar reference, so results agree to rounding: within
/// `1e-5 * |result| + 1e-6 * sum(|terms|)` (`tests/kernels.rs`). The portable set's quantized products, the
/// `quantize_q8_0` bytes, `axpy_f32` and `ops::rope_adjacent_pairs` are bit-identical in every set.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    /// Activation row to Q8_0 (round half to even; SIMD versions must give the same bytes). Its quants are in
    /// -127..=127, which the Q8_0 product relies on (AVX2's sign trick would overflow on -128).
    pub quantize_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    pub gemm_q8_0:
        fn(w: &[BlockQ8_0], a: &[BlockQ8_0], blocks_per_row: usize, out: &mut [f32], ldo: usize),
    pub gemm_q4_0:
        fn(w: &[BlockQ4_0], a: &[BlockQ8_0], blocks_per_row: usize, out: &mut [f32], ldo: usize),
    /// Activation row to Q8_K for the k-quant products: exactly ggml's `quantize_row_q8_K` (which is also what
    /// llama.cpp runs), so every set must give the same bytes.
    pub quantize_q8_k: fn(&[f32], &mut [BlockQ8K]),
    pub gemm_q4_k:
        fn(w: &[BlockQ4K], a: &[BlockQ8K], blocks_per_row: usize, out: &mut [f32], ldo: usize),
    pub gemm_q5_k:
        fn(w: &[BlockQ5K], a: &[BlockQ8K], blocks_per_row: usize, out: &mut [f32], ldo: usize),
    pub gemm_q6_k:
        fn(w: &[BlockQ6K], a: &[BlockQ8K], blocks_per_row: usize, out: &mut [f32], ldo: usize),
    pub gemm_f32: fn(w: &[f32], a: &[f32], cols: usize, out: &mut [f32], ldo: usize),
    pub gemm_f16: fn(w: &[f16], a: &[f32], cols: usize, out: &mut [f32], ldo: usize),
    pub gemm_bf16: fn(w: &[bf16], a: &[f32], cols: usize, out: &mut [f32], ldo: usize),
    /// Plain f32 dot product (attention scores).
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// `y += alpha * x` (the attention's weighted sum of values), rounded as `y[i] + alpha * x[i]` in every set.
    pub axpy_f32: fn(alpha: f32, x: &[f32], y: &mut [f32]),
}

/// Checks the output contract of the matrix kernels: a token-major `[n_tokens][ldo]` product of `rows` rows
/// fits in `out_len` values and rows do not overlap (`ldo >= rows`). Every kernel calls it before writing, so
/// the SIMD stores behind it may rely on it.
///
/// # Panics
/// When the contract does not hold.
#[inline]
pub fn check_out(out_len: usize, rows: usize, n_tokens: usize, ldo: usize) {
    assert!(
        ldo >= rows && (n_tokens == 0 || rows == 0 || out_len >= (n_tokens - 1) * ldo + rows),
        "output of {out_len} values cannot hold {n_tokens} tokens x {rows} rows at row stride {ldo}"
    );
}

/// A matrix product as one dot product per (row, token), written token-major `out[t * ldo + r]`: the scalar
/// references' loop, whatever the block types.
fn gemm_by_dots<W, A>(
    w: &[W],
    a: &[A],
    blocks_per_row: usize,
    out: &mut [f32],
    ldo: usize,
    dot: impl Fn(&[W], &[A]) -> f32,
) {
    let (rows, n) = (w.len() / blocks_per_row, a.len() / blocks_per_row);
    check_out(out.len(), rows, n, ldo);
    for (t, act) in a.chunks_exact(blocks_per_row).enumerate() {
        for (r, row) in w.chunks_exact(blocks_per_row).enumerate() {
            out[t * ldo + r] = dot(row, act);
        }
    }
}

pub const SCALAR: Kernels = Kernels {
    name: "scalar",
    quantize_q8_0: q8_0::quantize_activations_scalar,
    gemm_q8_0: q8_0::gemm_scalar,
    gemm_q4_0: q4_0::gemm_scalar,
    quantize_q8_k: quarry_quantize::blocks::quantize_q8_k,
    gemm_q4_k: q4_k::gemm_scalar,
    gemm_q5_k: q5_k::gemm_scalar,
    gemm_q6_k: q6_k::gemm_scalar,
    gemm_f32: float::gemm_f32_scalar,
    gemm_f16: float::gemm_f16_scalar,
    gemm_bf16: float::gemm_bf16_scalar,
    dot_f32: float::dot_f32_scalar,
    axpy_f32: float::axpy_f32_scalar,
};

/// Sizes every pool thread's kernel buffers for products over rows of up to `max_cols` weights, so that decoding
/// allocates nothing on whichever thread happens to run a share first. Prompt-sized products may still grow them
/// once per thread.
pub fn reserve_thread_scratch(max_cols: usize) {
    #[cfg(target_arch = "x86_64")]
    rayon::broadcast(|_| x86::reserve_few_token_scratch(max_cols.div_ceil(32)));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = max_cols;
}

/// Every kernel set this CPU can run, best last. The x86 sets are only ever handed out from here, after the
/// feature checks their `#[target_feature]` code relies on.
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
/// Its `name` is what `quarry info` and `bench` print.
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
