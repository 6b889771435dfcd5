//! Parallel regions on the rayon pool. A decode step multiplies ~700 small matrices; paying a fork/join for each
//! would cost more than the products, so the forward pass groups them: one region for Q, K and V, one for all
//! chosen experts' gate and up projections, one for their down projections. Each region is a flat list of work
//! items (a share of one matrix's rows), run by `parallel_items`.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::{ActivationRows, Kernels, WeightRows, gemm_rows};

/// Runs `work(i)` for every `i` in `0..n_items` as one rayon region (inline when the pool has one thread).
pub fn parallel_items(n_items: usize, work: impl Fn(usize) + Sync + Send) {
    if n_items <= 1 || rayon::current_num_threads() == 1 {
        (0..n_items).for_each(work);
    } else {
        (0..n_items).into_par_iter().for_each(work);
    }
}

/// Rows per work item for a matrix of `rows` rows: enough items that both threads stay busy to the end, few
/// enough that each is worth scheduling; a multiple of 16 so the kernels' row tiles stay whole.
pub fn rows_per_item(rows: usize, tokens: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Aim at ~8 items per thread for one token; fewer, larger ones when many tokens make each row costly.
    let target_items = if tokens > 8 { threads * 4 } else { threads * 8 };
    rows.div_ceil(target_items).next_multiple_of(16).max(16)
}

/// A buffer that the items of one region write into, each its own disjoint range.
pub struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` only hands out ranges through the unsafe `range_mut`, whose callers guarantee that no two
// live ranges overlap; with that, concurrent use from several threads is like holding disjoint `&mut` slices.
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub fn new(buf: &'a mut [f32]) -> SharedOut<'a> {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// No other live slice obtained from this `SharedOut` may overlap `start..start + len`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.len,
            "range {start}+{len} outside a buffer of {}",
            self.len
        );
        // SAFETY: in bounds (checked above) and not aliased (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// One matrix product of a region. Each work item (a share of `rows_per_item(rows, n)` rows starting at `r0`)
/// writes its part token-major, `[n][share rows]`, at `out[r0 * n..]`; `scatter_token_major` assembles them.
pub struct GemmJob<'a> {
    pub w: WeightRows<'a>,
    pub acts: ActivationRows<'a>,
    pub out: SharedOut<'a>,
}

/// Runs several products as one region, each split into row shares.
pub fn parallel_gemm(k: &Kernels, jobs: &[GemmJob]) {
    let chunk = |j: &GemmJob| rows_per_item(j.w.rows, j.acts.n);
    let n_items: usize = jobs.iter().map(|j| j.w.rows.div_ceil(chunk(j))).sum();
    parallel_items(n_items, |mut item| {
        for job in jobs {
            let c = chunk(job);
            let items = job.w.rows.div_ceil(c);
            if item < items {
                let r0 = item * c;
                let rows = c.min(job.w.rows - r0);
                let n = job.acts.n;
                // SAFETY: item `item` of this job owns rows r0..r0+rows, i.e. out[r0*n..(r0+rows)*n]; items
                // partition the rows, so no two items write the same range.
                let out = unsafe { job.out.range_mut(r0 * n, rows * n) };
                gemm_rows(k, &job.w.sub_rows(r0, rows), job.acts, out, rows);
                return;
            }
            item -= items;
        }
    });
}

/// Assembles a product of `rows` rows and `n` tokens that was computed in row shares of `chunk` rows (the last
/// one shorter), share after share in `src`, each share token-major (`[n][share rows]` at `src[r0 * n..]`),
/// into token-major `dst[t * stride + r]`: one contiguous copy per share and token.
pub fn scatter_token_major(
    src: &[f32],
    rows: usize,
    n: usize,
    chunk: usize,
    dst: &mut [f32],
    stride: usize,
) {
    if n == 1 {
        dst[..rows].copy_from_slice(&src[..rows]);
        return;
    }
    for r0 in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - r0);
        let share = &src[r0 * n..(r0 + len) * n];
        for (t, part) in share.chunks_exact(len).enumerate() {
            dst[t * stride + r0..t * stride + r0 + len].copy_from_slice(part);
        }
    }
}
