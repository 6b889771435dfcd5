//! Matrix products over weights stored in ggml blocks, and the f32 operations around them.
//!
//! Each weight format has a module with a plain scalar reference (`q8_0`, `q4_0`, `iq4_nl`, `q4_k`, `q5_k`,
//! `q6_k`, `float`); the SIMD sets sit beside them, one module per instruction set, each a [`Kernels`] table (the matrix
//! products, the activation quantizers, and the f32 operations of `ops`). A model is given one table when it is
//! loaded ([`selected`]: CPU feature detection, or `QUARRY_KERNEL`) and passes it down; it never asks which set
//! runs. It hands [`WeightRows`] views, [`ActivationBatch`]es and [`ProductOut`] windows to the regions of
//! [`parallel`], which decide how the work is split over the threads.
//!
//! The sets, from slowest to fastest:
//! - `scalar`: the references everything is tested against.
//! - `portable` (`portable.rs`): the `wide` crate, SIMD width chosen at compile time (SSE2 / NEON); integer
//!   block sums widened to i16. Runs everywhere.
//! - `avx2` (`x86/avx2.rs`): AVX2 + FMA + F16C, byte dots with `vpmaddubsw` + `vpmaddwd`.
//! - `avxvnni` (same file): the 256-bit `vpdpbusd` of CPUs with AVX-VNNI but no AVX-512.
//! - `avx512vnni` (`x86/avx512.rs`): AVX-512 F/BW/VL + VNNI, `vpdpbusd` on 512 bits.
//! - `avx512amx` (same file, `x86/amx.rs`): `avx512vnni` with the interleaved and k-quant products of 16 tokens
//!   and more on AMX's tile unit (Sapphire Rapids and later, when Linux grants the process the tile state).
//!
//! The x86 sets share their loop structure (`x86/mod.rs`): per-block dots for few tokens, one lane per token for
//! many. The shape of a call decides which runs, so callers need not care.
//!
//! A set may also read a matrix in another layout than the file's rows ([`Layout`]): AVX-512 VNNI multiplies
//! Q4_0, IQ4_NL, IQ4_XS, Q8_0, Q4_K and Q6_K rows interleaved in groups of 16 ([`q4_0::interleave`],
//! [`q8_0::interleave`], [`q4_k::interleave`], ...) with one lane per row for every token count, so a model on
//! it rewrites its matrices of those types so when it is loaded ([`Layout::for_kernels`]).
//!
//! **Every set is batch-invariant**: each token's outputs of a product are bit-identical whatever else is in the
//! call (that token alone, or among any number of others, at any position), and whichever rows of the matrix
//! the call covers, which a multi-sequence batch (and an MoE expert shared by however many tokens chose it)
//! relies on. Why, per set:
//! - `scalar`: one dot product per (row, token), nothing shared.
//! - `portable`: one output at a time too, each block's exact integer sum scaled and added in block order (the
//!   row pairs of the 32-block products compute each row exactly as a single row); its float products one dot
//!   per output.
//! - the x86 sets: their few-token, lane and tile kernels take the same float steps per output (per block, in order,
//!   `fma(cvt(exact integer sum), da * dw, acc)`), every few-token kernel reducing a block's integer lanes to
//!   the exact sum before its float step; their float products give every output its own accumulator of a
//!   fixed width (AVX-512's one-token ones on ymm pairs with the zmm products' bits). See "Batch invariance" in
//!   `x86/mod.rs`.
//!
//! `kernels::parallel` only splits products by rows, so it cannot change a bit either. `tests/batch_invariance.rs`
//! checks all of it by bits for every set this CPU has.

/// Safe entry points for a kernel set's table: each `fn name(args) = body;` becomes a plain `fn` that runs `body`
/// compiled inside a `#[target_feature(enable = FEATURES)]` function, so the whole product (every
/// `#[inline(always)]` helper it calls) is compiled with those features and no vector crosses a feature boundary.
///
/// Only for the tables of sets that [`available`] hands out after detecting `FEATURES`: that check is the safety
/// condition of the call into the feature-enabled function, and the bodies check slice lengths before any pointer
/// load.
#[cfg(target_arch = "x86_64")]
macro_rules! target_feature_entries {
    ($features:literal; $( $(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:expr; )*) => {
        $(
            $(#[$attr])*
            fn $name($($arg: $ty),*) $(-> $ret)? {
                #[target_feature(enable = $features)]
                #[allow(unused_unsafe)]
                $(#[$attr])*
                unsafe fn with_features($($arg: $ty),*) $(-> $ret)? {
                    unsafe { $body }
                }
                // SAFETY: see the macro's doc: the set holding this entry is only handed out by `available()`
                // after every feature in `$features` was detected.
                unsafe { with_features($($arg),*) }
            }
        )*
    };
}

mod float;
pub mod iq4_nl;
pub mod iq4_xs;
mod matmul;
pub mod ops;
pub(crate) mod parallel;
mod portable;
mod product_out;
pub mod q4_0;
pub mod q4_k;
mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub(crate) mod stream;
pub(crate) mod team;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use matmul::{
    ActivationBatch, ActivationRows, INTERLEAVE_ROWS, Layout, PackJob, PackedWeights, WeightRows,
    advise_huge_pages, gemm_rows, supported, wants_q8_0, wants_q8_k,
};
pub use ops::Ops;
pub use product_out::ProductOut;

use std::sync::OnceLock;

use half::{bf16, f16};
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
};

/// One set of kernels, all for the same instruction set.
///
/// The matrix kernels compute `W[r] . A[t]` for a block of weight rows `W` (row-major, `cols` weights each) and a
/// block of activation rows `A` (one per token, contiguous): the row count is `w.len() / blocks_per_row`, the
/// token count `a.len() / blocks_per_row`, and the [`ProductOut`] must be exactly that many tokens by rows (see
/// [`check_shape`]). Results go token-major at the output's stride, the layout everything after a product reads,
/// so a call can fill a thread's share of a wider matrix in place; nothing outside the window is written. One call
/// covers one thread's share of a product, so implementations may tile rows and tokens however their registers
/// suit.
///
/// Every set computes each 32-block's integer dot exactly; the float sums over blocks (and over f32/f16/bf16
/// products) may be associated differently from the scalar reference, so results agree to rounding: within
/// `1e-5 * |result| + 1e-6 * sum(|terms|)` (`tests/kernels.rs`). The portable set's quantized products, the
/// `quantize_q8_0` bytes, `axpy_f32` and `ops.rope` are bit-identical in every set.
///
/// Within a set, every product is batch-invariant (see the module docs): a token's outputs have the same bits
/// whatever other tokens the call holds and wherever the token sits among them, and a row's the same in any
/// window of rows (`tests/batch_invariance.rs`).
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    /// Activation row to Q8_0 (round half to even; SIMD versions must give the same bytes). Its quants are in
    /// -127..=127, which the Q8_0 product relies on (AVX2's sign trick would overflow on -128).
    pub quantize_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    pub gemm_q8_0: fn(w: &[BlockQ8_0], a: &[BlockQ8_0], blocks_per_row: usize, out: ProductOut),
    pub gemm_q4_0: fn(w: &[BlockQ4_0], a: &[BlockQ8_0], blocks_per_row: usize, out: ProductOut),
    /// The Q4_0 and Q8_0 products over rows interleaved in groups ([`q4_0::interleave`], [`q8_0::interleave`];
    /// the rows past the last whole group as they lie), in the sets that read that layout faster than rows as
    /// they lie; a model on such a set stores its matrices of the type so ([`Layout`]). Their results have the
    /// same bits as `gemm_q4_0`'s and `gemm_q8_0`'s over the same rows.
    pub gemm_q4_0_interleaved: Option<InterleavedGemm>,
    pub gemm_q8_0_interleaved: Option<InterleavedGemm>,
    pub gemm_iq4_nl: fn(w: &[BlockIQ4NL], a: &[BlockQ8_0], blocks_per_row: usize, out: ProductOut),
    /// IQ4_NL rows interleaved as Q4_0's ([`iq4_nl::interleave`]), with the same bits as `gemm_iq4_nl`'s.
    pub gemm_iq4_nl_interleaved: Option<InterleavedGemm>,
    /// IQ4_XS against Q8_0 activations, sub-block by sub-block ([`iq4_xs`]): `blocks_per_row` counts the
    /// activation blocks of a row (32 weights each, a multiple of 8), so a weight row holds `blocks_per_row / 8`
    /// super-blocks.
    pub gemm_iq4_xs: fn(w: &[BlockIQ4XS], a: &[BlockQ8_0], blocks_per_row: usize, out: ProductOut),
    /// IQ4_XS rows interleaved ([`iq4_xs::interleave`]), with the same bits as `gemm_iq4_xs`'s.
    pub gemm_iq4_xs_interleaved: Option<InterleavedGemm>,
    /// Activation row to Q8_K for the k-quant products: exactly ggml's `quantize_row_q8_K` (which is also what
    /// llama.cpp runs), so every set must give the same bytes.
    pub quantize_q8_k: fn(&[f32], &mut [BlockQ8K]),
    pub gemm_q4_k: fn(w: &[BlockQ4K], a: &[BlockQ8K], blocks_per_row: usize, out: ProductOut),
    /// Q4_K rows interleaved ([`q4_k::interleave`]), with the same bits as `gemm_q4_k`'s.
    pub gemm_q4_k_interleaved: Option<InterleavedKGemm>,
    pub gemm_q5_k: fn(w: &[BlockQ5K], a: &[BlockQ8K], blocks_per_row: usize, out: ProductOut),
    pub gemm_q6_k: fn(w: &[BlockQ6K], a: &[BlockQ8K], blocks_per_row: usize, out: ProductOut),
    /// Q6_K rows interleaved ([`q6_k::interleave`]), with the same bits as `gemm_q6_k`'s.
    pub gemm_q6_k_interleaved: Option<InterleavedKGemm>,
    pub gemm_f32: fn(w: &[f32], a: &[f32], cols: usize, out: ProductOut),
    pub gemm_f16: fn(w: &[f16], a: &[f32], cols: usize, out: ProductOut),
    pub gemm_bf16: fn(w: &[bf16], a: &[f32], cols: usize, out: ProductOut),
    /// `y += alpha * x` (adding a projection to the residual stream, an expert's output to its token's),
    /// rounded as `y[i] + alpha * x[i]` in every set.
    pub axpy_f32: fn(alpha: f32, x: &[f32], y: &mut [f32]),
    /// The f32 operations around the products (norm, RoPE, softmax, SiLU, attention), compiled for this set's
    /// instruction set.
    pub ops: Ops,
}

/// A product over rows interleaved in groups (`w`: the matrix's bytes, whole rows).
pub type InterleavedGemm = fn(w: &[u8], a: &[BlockQ8_0], blocks_per_row: usize, out: ProductOut);

/// A k-quant product over rows interleaved in groups (`w`: the matrix's bytes, whole rows; `blocks_per_row`
/// 256-blocks).
pub type InterleavedKGemm = fn(w: &[u8], a: &[BlockQ8K], blocks_per_row: usize, out: ProductOut);

impl Kernels {
    /// This set's product over interleaved rows of `ty`, if it has one.
    pub fn interleaved_gemm(&self, ty: quarry_quantize::gguf::GgmlType) -> Option<InterleavedGemm> {
        use quarry_quantize::gguf::GgmlType;
        match ty {
            GgmlType::Q4_0 => self.gemm_q4_0_interleaved,
            GgmlType::Q8_0 => self.gemm_q8_0_interleaved,
            GgmlType::IQ4_NL => self.gemm_iq4_nl_interleaved,
            GgmlType::IQ4_XS => self.gemm_iq4_xs_interleaved,
            _ => None,
        }
    }

    /// Whether this set has a product over interleaved rows of `ty` (and so wants a model's matrices of the
    /// type interleaved).
    pub fn reads_interleaved(&self, ty: quarry_quantize::gguf::GgmlType) -> bool {
        self.interleaved_gemm(ty).is_some() || self.interleaved_k_gemm(ty).is_some()
    }

    /// This set's k-quant product over interleaved rows of `ty`, if it has one.
    pub fn interleaved_k_gemm(
        &self,
        ty: quarry_quantize::gguf::GgmlType,
    ) -> Option<InterleavedKGemm> {
        use quarry_quantize::gguf::GgmlType;
        match ty {
            GgmlType::Q4_K => self.gemm_q4_k_interleaved,
            GgmlType::Q6_K => self.gemm_q6_k_interleaved,
            _ => None,
        }
    }
}

/// Checks the shape contract of the matrix kernels: the output window is exactly `n_tokens` x `rows`. Every kernel
/// calls it before writing, so the SIMD stores behind it may rely on it.
///
/// # Panics
/// When the contract does not hold.
#[inline]
pub(crate) fn check_shape(out: &ProductOut, rows: usize, n_tokens: usize) {
    assert!(
        out.rows() == rows && out.tokens() == n_tokens,
        "a product of {n_tokens} tokens x {rows} rows given an output of {} x {}",
        out.tokens(),
        out.rows()
    );
}

/// A matrix product as one dot product per (row, token): the scalar references' loop, whatever the block types.
fn gemm_by_dots<W, A>(
    w: &[W],
    a: &[A],
    blocks_per_row: usize,
    out: ProductOut,
    dot: impl Fn(&[W], &[A]) -> f32,
) {
    gemm_by_row_dots(w, blocks_per_row, a, blocks_per_row, out, dot)
}

/// [`gemm_by_dots`] for weight rows of `w_per_row` blocks against activation rows of `a_per_row` (IQ4_XS: one
/// super-block per 8 activation blocks).
fn gemm_by_row_dots<W, A>(
    w: &[W],
    w_per_row: usize,
    a: &[A],
    a_per_row: usize,
    mut out: ProductOut,
    dot: impl Fn(&[W], &[A]) -> f32,
) {
    assert!(w_per_row > 0 && a_per_row > 0);
    let (rows, n) = (w.len() / w_per_row, a.len() / a_per_row);
    check_shape(&out, rows, n);
    for (t, act) in a.chunks_exact(a_per_row).enumerate() {
        let o = out.token(t);
        for (r, row) in w.chunks_exact(w_per_row).enumerate() {
            o[r] = dot(row, act);
        }
    }
}

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    quantize_q8_0: q8_0::quantize_activations_scalar,
    gemm_q8_0: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, q8_0::dot_scalar),
    gemm_q4_0: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, q4_0::dot_scalar),
    gemm_q4_0_interleaved: None,
    gemm_q8_0_interleaved: None,
    gemm_iq4_nl: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, iq4_nl::dot_scalar),
    gemm_iq4_nl_interleaved: None,
    gemm_iq4_xs: |w, a, bpr, out| {
        gemm_by_row_dots(w, bpr / iq4_xs::SUB_BLOCKS, a, bpr, out, iq4_xs::dot_scalar)
    },
    gemm_iq4_xs_interleaved: None,
    quantize_q8_k: quarry_quantize::blocks::quantize_q8_k,
    gemm_q4_k: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, q4_k::dot_scalar),
    gemm_q4_k_interleaved: None,
    gemm_q5_k: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, q5_k::dot_scalar),
    gemm_q6_k: |w, a, bpr, out| gemm_by_dots(w, a, bpr, out, q6_k::dot_scalar),
    gemm_q6_k_interleaved: None,
    gemm_f32: |w, a, cols, out| gemm_by_dots(w, a, cols, out, float::dot_f32_scalar),
    gemm_f16: |w, a, cols, out| gemm_by_dots(w, a, cols, out, float::dot_f16_scalar),
    gemm_bf16: |w, a, cols, out| gemm_by_dots(w, a, cols, out, float::dot_bf16_scalar),
    axpy_f32: float::axpy_f32_scalar,
    ops: ops::SCALAR,
};

/// Sizes every pool thread's kernel buffers for products over rows of up to `max_cols` weights, so that no
/// product allocates, whichever thread runs which share of it: which expert's tokens (and how many) land on
/// which thread changes from step to step.
pub fn reserve_thread_scratch(max_cols: usize) {
    #[cfg(target_arch = "x86_64")]
    rayon::broadcast(|_| x86::reserve_scratch(max_cols));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = max_cols;
}

/// Every kernel set this CPU can run, best last. The x86 sets are only ever handed out from here, after the
/// feature checks their `#[target_feature]` code relies on.
pub fn available() -> Vec<&'static Kernels> {
    #[allow(unused_mut)]
    let mut all = vec![&SCALAR, &portable::SET];
    #[cfg(target_arch = "x86_64")]
    {
        if x86::avx2::detected() {
            all.push(&x86::avx2::SET);
        }
        if x86::avx2::detected_vnni() {
            all.push(&x86::avx2::SET_VNNI);
        }
        if x86::avx512::detected() {
            all.push(&x86::avx512::SET);
            if x86::amx::granted() {
                all.push(&x86::avx512::SET_AMX);
            }
        }
    }
    all
}

/// The kernel set a model gets when it is loaded: `QUARRY_KERNEL=<name>` if set (and available), else the best
/// available. Decided once per process; its `name` is what `quarry info` and `bench` print.
pub fn selected() -> &'static Kernels {
    static SELECTED: OnceLock<&'static Kernels> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let all = available();
        let best = all[all.len() - 1];
        match std::env::var("QUARRY_KERNEL") {
            Ok(want) => match all.iter().find(|k| k.name == want) {
                Some(k) => k,
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

/// The check every interleaved layout's tests share: for 1 and 3 blocks a row, every block of 48 rows (made by
/// `block(i)`) comes back from where `interleave` put it (compared by bytes: some made f16 are NaN), and a
/// group is exactly its rows' bytes (the second group interleaved alone lands where it did among all).
#[cfg(test)]
pub(crate) fn check_interleave_round_trip<B: bytemuck::Pod>(
    block: impl Fn(usize) -> B,
    interleave: fn(&[B], usize, &mut [u8]),
    interleaved_block: fn(&[u8], usize, usize, usize) -> B,
) {
    for bpr in [1, 3] {
        let rows = 48;
        let blocks: Vec<B> = (0..rows * bpr).map(&block).collect();
        let mut packed = vec![0u8; size_of_val(blocks.as_slice())];
        interleave(&blocks, bpr, &mut packed);
        for r in 0..rows {
            for b in 0..bpr {
                assert_eq!(
                    bytemuck::bytes_of(&interleaved_block(&packed, bpr, r, b)),
                    bytemuck::bytes_of(&blocks[r * bpr + b]),
                    "row {r}, block {b}"
                );
            }
        }
        let group = INTERLEAVE_ROWS * bpr * size_of::<B>();
        let mut second = vec![0u8; group];
        interleave(&blocks[16 * bpr..32 * bpr], bpr, &mut second);
        assert_eq!(second, packed[group..2 * group]);
    }
}
