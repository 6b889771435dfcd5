//! Matrix products of model weights with a batch of activations: the layer between the model and the kernels.

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};
use quarry_quantize::gguf::GgmlType;

use super::Kernels;

/// Whether activations must be quantized to Q8_0 for a weight type's dot product.
pub fn wants_q8_0(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0)
}

/// Weight types the kernels can multiply with.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0
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

    /// Dequantizes row `r` into `out` (used for the token embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.ty {
            GgmlType::F32 => out.copy_from_slice(bytemuck::cast_slice(row)),
            GgmlType::F16 => {
                for (o, v) in out.iter_mut().zip(bytemuck::cast_slice::<u8, f16>(row)) {
                    *o = v.to_f32();
                }
            }
            GgmlType::BF16 => {
                for (o, v) in out.iter_mut().zip(bytemuck::cast_slice::<u8, bf16>(row)) {
                    *o = v.to_f32();
                }
            }
            GgmlType::Q8_0 => {
                for (o, b) in out
                    .chunks_exact_mut(32)
                    .zip(bytemuck::cast_slice::<u8, BlockQ8_0>(row))
                {
                    let d = b.d.to_f32();
                    for (v, &q) in o.iter_mut().zip(&b.qs) {
                        *v = q as f32 * d;
                    }
                }
            }
            GgmlType::Q4_0 => {
                for (o, b) in out
                    .chunks_exact_mut(32)
                    .zip(bytemuck::cast_slice::<u8, BlockQ4_0>(row))
                {
                    let d = b.d.to_f32();
                    for j in 0..16 {
                        o[j] = ((b.qs[j] & 0x0f) as i32 - 8) as f32 * d;
                        o[j + 16] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
                    }
                }
            }
            other => unreachable!("weight type {other} was refused at load"),
        }
    }
}

/// Activations of a batch of tokens (token-major, `dim` values each), with their Q8_0 form computed on demand.
pub struct ActivationBatch {
    dim: usize,
    n: usize,
    x: Vec<f32>,
    q8: Vec<BlockQ8_0>,
    q8_ready: bool,
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
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Sets the batch size and returns the f32 values for writing; the quantized form becomes stale.
    pub fn start(&mut self, n: usize) -> &mut [f32] {
        assert!(
            n * self.dim <= self.x.len(),
            "batch of {n} exceeds the capacity this buffer was made with"
        );
        self.n = n;
        self.q8_ready = false;
        &mut self.x[..n * self.dim]
    }

    pub fn values(&self) -> &[f32] {
        &self.x[..self.n * self.dim]
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        self.q8_ready = false;
        &mut self.x[..self.n * self.dim]
    }

    /// Makes the Q8_0 form current if `ty` needs it (once per batch, however many matrices use it).
    pub fn prepare_for(&mut self, ty: GgmlType, k: &Kernels) {
        if wants_q8_0(ty) && !self.q8_ready {
            let blocks = self.dim / 32;
            for t in 0..self.n {
                (k.quantize_q8_0)(
                    &self.x[t * self.dim..(t + 1) * self.dim],
                    &mut self.q8[t * blocks..(t + 1) * blocks],
                );
            }
            self.q8_ready = true;
        }
    }

    fn q8_rows(&self, n: usize) -> &[BlockQ8_0] {
        debug_assert!(self.q8_ready);
        &self.q8[..n * (self.dim / 32)]
    }

    /// Copies the rows `tokens` of `src` into this batch, in that order, with their quantized form if `src` had
    /// it: the tokens routed to one expert become one contiguous batch for its matrix products.
    pub fn gather_from(&mut self, src: &ActivationBatch, tokens: &[usize]) {
        assert_eq!(self.dim, src.dim);
        let (d, blocks) = (self.dim, self.dim / 32);
        let x = self.start(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            x[i * d..(i + 1) * d].copy_from_slice(&src.x[t * d..(t + 1) * d]);
        }
        if src.q8_ready {
            for (i, &t) in tokens.iter().enumerate() {
                self.q8[i * blocks..(i + 1) * blocks]
                    .copy_from_slice(&src.q8[t * blocks..(t + 1) * blocks]);
            }
            self.q8_ready = true;
        }
    }
}

/// `out[t * out_stride + r] = W[r] . x[t]` for every weight row and every token of `acts` (which must be
/// prepared for the weight type). Each weight row is read once for all the tokens.
pub fn matmul(
    k: &Kernels,
    w: &WeightRows,
    acts: &ActivationBatch,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Vec<f32>,
) {
    let n = acts.len();
    scratch.clear();
    scratch.resize(w.rows * n, 0.0);
    gemm_rows(k, w, acts, scratch);
    for r in 0..w.rows {
        for t in 0..n {
            out[t * out_stride + r] = scratch[r * n + t];
        }
    }
}

/// `out[r * n_tokens + t] = W[r] . x[t]`: the kernel call for one share of rows.
pub fn gemm_rows(k: &Kernels, w: &WeightRows, acts: &ActivationBatch, out: &mut [f32]) {
    let n = acts.len();
    match w.ty {
        GgmlType::Q8_0 => (k.gemm_q8_0)(
            bytemuck::cast_slice(w.data),
            acts.q8_rows(n),
            w.cols / 32,
            out,
        ),
        GgmlType::Q4_0 => (k.gemm_q4_0)(
            bytemuck::cast_slice(w.data),
            acts.q8_rows(n),
            w.cols / 32,
            out,
        ),
        GgmlType::F32 => (k.gemm_f32)(bytemuck::cast_slice(w.data), acts.values(), w.cols, out),
        GgmlType::F16 => (k.gemm_f16)(bytemuck::cast_slice(w.data), acts.values(), w.cols, out),
        GgmlType::BF16 => (k.gemm_bf16)(bytemuck::cast_slice(w.data), acts.values(), w.cols, out),
        other => unreachable!("weight type {other} was refused at load"),
    }
}
