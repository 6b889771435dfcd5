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

/// One matrix product of a region: `out[r * n + t] = W[r] . A[t]` (row-major output).
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
                gemm_rows(k, &job.w.sub_rows(r0, rows), job.acts, out);
                return;
            }
            item -= items;
        }
    });
}

/// Copies a row-major `[rows][n]` product into token-major `dst[t * stride + r]`, in 16 x 16 tiles so that
/// both the reads and the strided writes stay within a few cache lines at a time.
pub fn scatter_token_major(src: &[f32], rows: usize, n: usize, dst: &mut [f32], stride: usize) {
    if n == 1 {
        dst[..rows].copy_from_slice(&src[..rows]);
        return;
    }
    const TILE: usize = 16;
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for t0 in (0..n).step_by(TILE) {
            let t1 = (t0 + TILE).min(n);
            for r in r0..r1 {
                let row = &src[r * n..(r + 1) * n];
                for t in t0..t1 {
                    dst[t * stride + r] = row[t];
                }
            }
        }
    }
}
