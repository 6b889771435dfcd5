//! Rows of f32 to the bytes of a GGUF tensor type, in parallel on the rayon pool.

use rayon::prelude::*;

use half::slice::HalfFloatSliceExt;

use bytemuck::{Pod, Zeroable};

use crate::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, quantize_iq4_nl,
    quantize_iq4_xs, quantize_q4_0, quantize_q4_k, quantize_q5_k, quantize_q6_k, quantize_q8_0,
};
use crate::gguf::GgmlType;

/// Rows handed to one rayon task: enough work to outweigh the task's overhead even for narrow rows.
fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Reusable output buffers (one chunk of a tensor after another): blocks are quantized straight into typed
/// buffers, which are always suitably aligned, and handed out as bytes.
pub struct RowEncoder {
    ty: GgmlType,
    bytes: Vec<u8>,
    halves: Vec<half::f16>,
    q8: Vec<BlockQ8_0>,
    q4: Vec<BlockQ4_0>,
    q4k: Vec<BlockQ4K>,
    q5k: Vec<BlockQ5K>,
    q6k: Vec<BlockQ6K>,
    iq4nl: Vec<BlockIQ4NL>,
    iq4xs: Vec<BlockIQ4XS>,
}

/// Quantizes `values` into `blocks` (resized to fit) on the rayon pool, `task` values (whole rows) per task.
fn quantize_parallel<'a, B: Pod + Zeroable + Send>(
    blocks: &'a mut Vec<B>,
    values: &[f32],
    task: usize,
    block_len: usize,
    quantize: fn(&[f32], &mut [B]),
) -> &'a [u8] {
    blocks.resize(values.len() / block_len, B::zeroed());
    blocks
        .par_chunks_mut(task / block_len)
        .zip(values.par_chunks(task))
        .for_each(|(blocks, x)| quantize(x, blocks));
    bytemuck::cast_slice(blocks)
}

impl RowEncoder {
    /// `ty` must be F32, F16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL or IQ4_XS (the recipe only produces those).
    pub fn new(ty: GgmlType) -> RowEncoder {
        RowEncoder {
            ty,
            bytes: Vec::new(),
            halves: Vec::new(),
            q8: Vec::new(),
            q4: Vec::new(),
            q4k: Vec::new(),
            q5k: Vec::new(),
            q6k: Vec::new(),
            iq4nl: Vec::new(),
            iq4xs: Vec::new(),
        }
    }

    /// Encodes whole rows of `row_len` values; for block types `row_len` must be a multiple of the block length.
    pub fn encode(&mut self, values: &[f32], row_len: usize) -> &[u8] {
        let task = rows_per_task(row_len) * row_len;
        let block_len = self.ty.block_len();
        match self.ty {
            GgmlType::Q8_0 => {
                quantize_parallel(&mut self.q8, values, task, block_len, quantize_q8_0)
            }
            GgmlType::Q4_0 => {
                quantize_parallel(&mut self.q4, values, task, block_len, quantize_q4_0)
            }
            GgmlType::Q4_K => {
                quantize_parallel(&mut self.q4k, values, task, block_len, quantize_q4_k)
            }
            GgmlType::Q5_K => {
                quantize_parallel(&mut self.q5k, values, task, block_len, quantize_q5_k)
            }
            GgmlType::Q6_K => {
                quantize_parallel(&mut self.q6k, values, task, block_len, quantize_q6_k)
            }
            GgmlType::IQ4_NL => {
                quantize_parallel(&mut self.iq4nl, values, task, block_len, quantize_iq4_nl)
            }
            GgmlType::IQ4_XS => {
                quantize_parallel(&mut self.iq4xs, values, task, block_len, quantize_iq4_xs)
            }
            GgmlType::F16 => {
                // half's slice conversion rounds to nearest even like `f16::from_f32`, with F16C where present.
                self.halves.resize(values.len(), half::f16::ZERO);
                self.halves
                    .par_chunks_mut(task)
                    .zip(values.par_chunks(task))
                    .for_each(|(out, x)| out.convert_from_f32_slice(x));
                bytemuck::cast_slice(&self.halves)
            }
            GgmlType::F32 => {
                self.bytes.clear();
                self.bytes
                    .extend(values.iter().flat_map(|v| v.to_le_bytes()));
                &self.bytes
            }
            other => unreachable!("the type recipe never asks for {other}"),
        }
    }
}

/// Reorders the rows of whole attention heads from HF's rotate-half RoPE layout (pairs `(i, i + hd/2)`) to
/// llama.cpp's adjacent pairs `(2i, 2i + 1)`: output row `2i + j` of a head is input row `j * hd/2 + i`.
/// `values` must hold whole heads of `head_dim` rows.
pub fn permute_rope_rows(values: &[f32], row_len: usize, head_dim: usize, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(values.len());
    let half = head_dim / 2;
    for head in values.chunks_exact(head_dim * row_len) {
        for i in 0..half {
            for j in 0..2 {
                let row = j * half + i;
                out.extend_from_slice(&head[row * row_len..(row + 1) * row_len]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_two_halves_of_each_head() {
        // two heads of 4 rows, rows of one value = the row index
        let values: Vec<f32> = (0..8).map(|r| r as f32).collect();
        let mut out = Vec::new();
        permute_rope_rows(&values, 1, 4, &mut out);
        assert_eq!(out, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        // rows of two values move together
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        permute_rope_rows(&values, 2, 4, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn encodes_each_type_like_the_reference() {
        let values: Vec<f32> = (0..192)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q8 = vec![bytemuck::Zeroable::zeroed(); 6];
        quantize_q8_0(&values, &mut q8);
        assert_eq!(
            RowEncoder::new(GgmlType::Q8_0).encode(&values, 64),
            bytemuck::cast_slice::<BlockQ8_0, u8>(&q8)
        );
        let mut q4 = vec![bytemuck::Zeroable::zeroed(); 6];
        quantize_q4_0(&values, &mut q4);
        assert_eq!(
            RowEncoder::new(GgmlType::Q4_0).encode(&values, 96),
            bytemuck::cast_slice::<BlockQ4_0, u8>(&q4)
        );
        let f32_bytes = RowEncoder::new(GgmlType::F32).encode(&values, 64).to_vec();
        assert_eq!(&f32_bytes[4..8], &values[1].to_le_bytes());
        let mut x6 = vec![BlockQ6K::zeroed(); 3];
        let values: Vec<f32> = (0..768)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        quantize_q6_k(&values, &mut x6);
        assert_eq!(
            RowEncoder::new(GgmlType::Q6_K).encode(&values, 256),
            bytemuck::cast_slice::<BlockQ6K, u8>(&x6)
        );
        let mut x4 = vec![BlockQ4K::zeroed(); 3];
        quantize_q4_k(&values, &mut x4);
        assert_eq!(
            RowEncoder::new(GgmlType::Q4_K).encode(&values, 256),
            bytemuck::cast_slice::<BlockQ4K, u8>(&x4)
        );
        let mut x5 = vec![BlockQ5K::zeroed(); 3];
        quantize_q5_k(&values, &mut x5);
        assert_eq!(
            RowEncoder::new(GgmlType::Q5_K).encode(&values, 768),
            bytemuck::cast_slice::<BlockQ5K, u8>(&x5)
        );
        let mut nl = vec![BlockIQ4NL::zeroed(); 24];
        quantize_iq4_nl(&values, &mut nl);
        assert_eq!(
            RowEncoder::new(GgmlType::IQ4_NL).encode(&values, 96),
            bytemuck::cast_slice::<BlockIQ4NL, u8>(&nl)
        );
        let mut xs = vec![BlockIQ4XS::zeroed(); 3];
        quantize_iq4_xs(&values, &mut xs);
        assert_eq!(
            RowEncoder::new(GgmlType::IQ4_XS).encode(&values, 256),
            bytemuck::cast_slice::<BlockIQ4XS, u8>(&xs)
        );
        let f16_bytes = RowEncoder::new(GgmlType::F16).encode(&values, 64).to_vec();
        assert_eq!(
            &f16_bytes[2..4],
            &half::f16::from_f32(values[1]).to_le_bytes()
        );
    }
}
