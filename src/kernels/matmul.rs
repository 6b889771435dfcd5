//! Matrix products of model weights with a batch of activations: the layer between the model and the kernels.

use half::f16;
use quarry_quantize::blocks::{BlockQ8_0, BlockQ8K, QK_K};
use quarry_quantize::gguf::GgmlType;

use bytemuck::Zeroable;

use super::{Kernels, ProductOut};

/// Whether activations must be quantized to Q8_0 for a weight type's dot product.
pub fn wants_q8_0(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0)
}

/// Whether activations must be quantized to Q8_K (256 per block, f32 scale) for a weight type's dot product.
pub fn wants_q8_k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// Weight types the kernels can multiply with.
pub fn supported(ty: GgmlType) -> bool {
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
    )
}

/// A weight matrix borrowed from the model file: `rows` rows of `cols` weights, row-major, in ggml blocks.
#[derive(Clone, Copy, Debug)]
pub struct WeightRows<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightRows<'a> {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Rows `start..start + len` as their own matrix (an expert of a stacked `[E, rows, cols]` tensor, or a
    /// thread's share).
    pub fn sub_rows(&self, start: usize, len: usize) -> WeightRows<'a> {
        let n = self.row_bytes();
        WeightRows {
            ty: self.ty,
            rows: len,
            cols: self.cols,
            data: &self.data[start * n..(start + len) * n],
        }
    }

    /// Dequantizes row `r` into `out` (the token embedding lookup), with the format crate's decoders.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quarry_quantize::convert::decode_values(self.ty, self.row(r), out);
    }
}

/// Activations of a batch of tokens (token-major, `dim` values each), with their Q8_0 and Q8_K forms computed
/// on demand (a layer whose matrices mix Q4_K and Q6_K, or a Q4_0 file with Q8_0 fallbacks, shares one each).
pub struct ActivationBatch {
    dim: usize,
    n: usize,
    x: Vec<f32>,
    q8: Vec<BlockQ8_0>,
    q8_ready: bool,
    /// Empty when `dim` is not a multiple of 256 (no k-quant matrix can have such rows).
    q8k: Vec<BlockQ8K>,
    q8k_ready: bool,
    /// False when rows were gathered in their quantized forms only (see `append_rows_from`).
    values_ready: bool,
}

/// Rows of an [`ActivationBatch`] as the kernels read them: the f32 values and, when prepared, the Q8_0 and
/// Q8_K blocks.
#[derive(Clone, Copy)]
pub struct ActivationRows<'a> {
    pub n: usize,
    pub f32: &'a [f32],
    pub q8: &'a [BlockQ8_0],
    pub q8k: &'a [BlockQ8K],
}

impl ActivationBatch {
    /// Room for `max_tokens` rows of `dim` values; nothing is allocated later.
    pub fn new(dim: usize, max_tokens: usize) -> ActivationBatch {
        ActivationBatch {
            dim,
            n: 0,
            x: vec![0.0; dim * max_tokens],
            q8: vec![
                BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; 32]
                };
                dim.div_ceil(32) * max_tokens
            ],
            q8_ready: false,
            q8k: vec![
                BlockQ8K::zeroed();
                if dim.is_multiple_of(QK_K) {
                    dim / QK_K * max_tokens
                } else {
                    0
                }
            ],
            q8k_ready: false,
            values_ready: true,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    /// Sets the batch size and returns the f32 values for writing; the quantized form becomes stale.
    pub fn start(&mut self, n: usize) -> &mut [f32] {
        assert!(
            n * self.dim <= self.x.len(),
            "batch of {n} exceeds the capacity this buffer was made with"
        );
        self.n = n;
        self.q8_ready = false;
        self.q8k_ready = false;
        self.values_ready = true;
        &mut self.x[..n * self.dim]
    }

    /// Makes the Q8_0 or Q8_K form current if `ty` needs it (once per batch, however many matrices use it).
    pub fn prepare_for(&mut self, ty: GgmlType, k: &Kernels) {
        if !self.values_ready {
            assert!(
                (!wants_q8_k(ty) || self.q8k_ready) && (!wants_q8_0(ty) || self.q8_ready),
                "rows gathered without their f32 values cannot be quantized for {ty}"
            );
            return;
        }
        if wants_q8_k(ty) && !self.q8k_ready {
            let (d, blocks) = (self.dim, self.dim / QK_K);
            assert!(
                d.is_multiple_of(QK_K),
                "{ty} rows of {d} values (the loader checks they are whole blocks)"
            );
            for (x, q) in self.x[..self.n * d]
                .chunks_exact(d)
                .zip(self.q8k.chunks_exact_mut(blocks))
            {
                (k.quantize_q8_k)(x, q);
            }
            self.q8k_ready = true;
        }
        if wants_q8_0(ty) && !self.q8_ready {
            let (d, blocks) = (self.dim, self.dim / 32);
            for (x, q) in self.x[..self.n * d]
                .chunks_exact(d)
                .zip(self.q8.chunks_exact_mut(blocks))
            {
                (k.quantize_q8_0)(x, q);
            }
            self.q8_ready = true;
        }
    }

    /// Rows `start..start + n` for the kernels (the Q8_0 and Q8_K parts are empty unless prepared).
    pub fn rows(&self, start: usize, n: usize) -> ActivationRows<'_> {
        assert!(
            start + n <= self.n,
            "rows {start}..{} of a batch of {}",
            start + n,
            self.n
        );
        let blocks = self.dim / 32;
        ActivationRows {
            n,
            f32: if self.values_ready {
                &self.x[start * self.dim..(start + n) * self.dim]
            } else {
                &[]
            },
            q8: if self.q8_ready {
                &self.q8[start * blocks..(start + n) * blocks]
            } else {
                &[]
            },
            q8k: if self.q8k_ready {
                let kb = self.dim / QK_K;
                &self.q8k[start * kb..(start + n) * kb]
            } else {
                &[]
            },
        }
    }

    pub fn all_rows(&self) -> ActivationRows<'_> {
        self.rows(0, self.n)
    }

    /// Copies the rows `tokens` of `src` into this batch after its current rows, with their quantized form if
    /// `src` has it, and their f32 values if `with_values`: the tokens routed to the experts become contiguous
    /// batches for the matrix products. Quantized experts need only the quantized form, a quarter of the
    /// bytes (copying the f32 values too took 4% of prompt processing).
    pub fn append_rows_from(
        &mut self,
        src: &ActivationBatch,
        tokens: impl Iterator<Item = usize>,
        with_values: bool,
    ) {
        assert_eq!(self.dim, src.dim);
        assert!(
            src.values_ready || !with_values,
            "the source rows have no f32 values"
        );
        if self.n == 0 {
            self.q8_ready = src.q8_ready;
            self.q8k_ready = src.q8k_ready;
            self.values_ready = with_values;
        }
        assert!(
            self.q8_ready == src.q8_ready
                && self.q8k_ready == src.q8k_ready
                && self.values_ready == with_values,
            "appending rows with and without their quantized forms or values"
        );
        let (d, blocks, kb) = (self.dim, self.dim / 32, self.dim / QK_K);
        for t in tokens {
            let i = self.n;
            assert!(
                (i + 1) * d <= self.x.len(),
                "batch exceeds the capacity this buffer was made with"
            );
            if with_values {
                self.x[i * d..(i + 1) * d].copy_from_slice(&src.x[t * d..(t + 1) * d]);
            }
            if src.q8_ready {
                self.q8[i * blocks..(i + 1) * blocks]
                    .copy_from_slice(&src.q8[t * blocks..(t + 1) * blocks]);
            }
            if src.q8k_ready {
                self.q8k[i * kb..(i + 1) * kb].copy_from_slice(&src.q8k[t * kb..(t + 1) * kb]);
            }
            self.n += 1;
        }
    }
}

/// `W[r] . x[t]` for every row of `w` and activation row of `acts`, into `out` (exactly `acts.n` tokens x
/// `w.rows` rows): the kernel call, with the activation form the weight type needs.
pub fn gemm_rows(k: &Kernels, w: &WeightRows, acts: ActivationRows, out: ProductOut) {
    if acts.n == 0 || w.rows == 0 {
        return;
    }
    super::check_shape(&out, w.rows, acts.n);
    match w.ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            assert!(!acts.q8.is_empty(), "activations not prepared for {}", w.ty)
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            assert!(
                !acts.q8k.is_empty(),
                "activations not prepared for {}",
                w.ty
            )
        }
        _ => assert!(
            !acts.f32.is_empty(),
            "activations gathered without f32 values for {}",
            w.ty
        ),
    }
    let data = w.data;
    match w.ty {
        GgmlType::Q8_0 => (k.gemm_q8_0)(cast(data), acts.q8, w.cols / 32, out),
        GgmlType::Q4_0 => (k.gemm_q4_0)(cast(data), acts.q8, w.cols / 32, out),
        GgmlType::Q4_K => (k.gemm_q4_k)(cast(data), acts.q8k, w.cols / QK_K, out),
        GgmlType::Q5_K => (k.gemm_q5_k)(cast(data), acts.q8k, w.cols / QK_K, out),
        GgmlType::Q6_K => (k.gemm_q6_k)(cast(data), acts.q8k, w.cols / QK_K, out),
        GgmlType::F32 => (k.gemm_f32)(cast(data), acts.f32, w.cols, out),
        GgmlType::F16 => (k.gemm_f16)(cast(data), acts.f32, w.cols, out),
        GgmlType::BF16 => (k.gemm_bf16)(cast(data), acts.f32, w.cols, out),
        other => unreachable!("weight type {other} was refused at load"),
    }
}

/// The mapped bytes of a weight matrix as its blocks (the loader checked sizes and alignment).
fn cast<T: bytemuck::Pod>(data: &[u8]) -> &[T] {
    bytemuck::cast_slice(data)
}
