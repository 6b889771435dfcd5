//! Matrix products of model weights with a batch of activations: the layer between the model and the kernels.

use half::f16;
use quarry_quantize::blocks::{BlockQ8_0, BlockQ8K, QK_K};
use quarry_quantize::gguf::GgmlType;

use std::sync::Arc;

use bytemuck::Zeroable;
use rayon::prelude::*;

use super::{Kernels, ProductOut};

/// Whether activations must be quantized to Q8_0 for a weight type's dot product.
pub fn wants_q8_0(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS
    )
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
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// How a matrix's blocks are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, as in the file.
    Rows,
    /// Q4_0, IQ4_NL, IQ4_XS, Q8_0, Q4_K or Q6_K rows in groups of [`INTERLEAVE_ROWS`]
    /// ([`super::q4_0::interleave`], [`super::iq4_nl::interleave`], [`super::iq4_xs::interleave`],
    /// [`super::q8_0::interleave`], [`super::q4_k::interleave`], [`super::q6_k::interleave`]), the rows past
    /// the last whole group after them as they lie, for a set with that type's interleaved product. Each group takes as many bytes as its rows do in the file, so every row
    /// range the model cuts (an expert, a thread's share) is the same byte range as in the file.
    Interleaved,
}

/// Rows per group of [`Layout::Interleaved`].
pub const INTERLEAVE_ROWS: usize = 16;

impl Layout {
    /// The layout kernel set `k` reads a matrix of `ty` fastest in.
    pub fn for_kernels(k: &Kernels, ty: GgmlType) -> Layout {
        if k.reads_interleaved(ty) {
            Layout::Interleaved
        } else {
            Layout::Rows
        }
    }
}

/// A matrix to rewrite in another [`Layout`] than the file's: `rows` rows of `cols` weights of type `ty` (whole
/// blocks, the loader checked).
pub struct PackJob<'a> {
    pub layout: Layout,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

/// The packed copies of a model's matrices, in one allocation: aligned to 2 MiB and advised as huge pages, so
/// the kernels stream them with few TLB misses. (With 4 KiB pages the requests the kernels make 16 KiB ahead
/// keep missing the TLB: interleaved Q4_0 at 2 to 4 tokens read 22 GB/s from DRAM here, 27 from huge pages.)
struct PackedArena {
    /// Zeroed by the allocator (fresh pages for a large buffer, touched only when written), with room to align.
    buf: Vec<u8>,
    start: usize,
}

/// A packed copy of one matrix: its byte range of the model's arena.
pub struct PackedWeights {
    layout: Layout,
    arena: Arc<PackedArena>,
    start: usize,
    len: usize,
}

impl PackedWeights {
    /// Every job's matrix rewritten in its layout, in parallel, into one arena; `packed(i)` runs as soon as job
    /// `i` is done (to release the pages it was copied from, so the copies and the originals are not all
    /// resident at once).
    ///
    /// # Panics
    /// When a job's layout is [`Layout::Rows`], or its type has no interleaved form.
    pub fn pack_all(jobs: &[PackJob], packed: impl Fn(usize) + Sync) -> Vec<PackedWeights> {
        // Each copy starts on a cache line.
        let mut offsets = Vec::with_capacity(jobs.len());
        let mut total = 0;
        for j in jobs {
            offsets.push(total);
            total = (total + j.data.len()).next_multiple_of(64);
        }
        const HUGE: usize = 2 << 20;
        let mut buf = vec![0u8; total + HUGE];
        let start = buf.as_ptr().align_offset(HUGE);
        let arena = &mut buf[start..start + total];
        advise_huge_pages(arena);
        // Disjoint windows of the arena, one per job.
        let mut windows = Vec::with_capacity(jobs.len());
        let mut rest = arena;
        for (i, j) in jobs.iter().enumerate() {
            let gap = offsets[i] - (total - rest.len());
            let (w, tail) = rest[gap..].split_at_mut(j.data.len());
            windows.push(w);
            rest = tail;
        }
        windows
            .into_par_iter()
            .zip(jobs.par_iter())
            .enumerate()
            .for_each(|(i, (dst, j))| {
                pack(j, dst);
                packed(i);
            });
        let arena = Arc::new(PackedArena { buf, start });
        jobs.iter()
            .zip(offsets)
            .map(|(j, off)| PackedWeights {
                layout: j.layout,
                arena: arena.clone(),
                start: off,
                len: j.data.len(),
            })
            .collect()
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn bytes(&self) -> &[u8] {
        let a = &self.arena;
        &a.buf[a.start + self.start..a.start + self.start + self.len]
    }
}

/// Writes job `j`'s matrix in its layout into `dst` (exactly its size): whole groups interleaved, the rows past
/// them copied as they are, at the same offsets.
fn pack(j: &PackJob, dst: &mut [u8]) {
    let (ty, rows, bpr) = (j.ty, j.rows, j.cols / j.ty.block_len());
    assert!(
        j.layout == Layout::Interleaved
            && matches!(
                ty,
                GgmlType::Q4_0
                    | GgmlType::IQ4_NL
                    | GgmlType::IQ4_XS
                    | GgmlType::Q8_0
                    | GgmlType::Q4_K
                    | GgmlType::Q6_K
            ),
        "{ty} cannot be packed as {:?}",
        j.layout
    );
    assert_eq!(
        j.data.len(),
        rows * bpr * ty.block_bytes(),
        "a {rows} x {} {ty} matrix",
        j.cols
    );
    let split = rows / INTERLEAVE_ROWS * INTERLEAVE_ROWS * bpr * ty.block_bytes();
    let (groups, tail) = dst.split_at_mut(split);
    match ty {
        // IQ4_NL blocks are laid out as Q4_0's.
        GgmlType::Q4_0 | GgmlType::IQ4_NL => {
            super::q4_0::interleave(bytemuck::cast_slice(&j.data[..split]), bpr, groups)
        }
        GgmlType::IQ4_XS => {
            super::iq4_xs::interleave(bytemuck::cast_slice(&j.data[..split]), bpr, groups)
        }
        GgmlType::Q4_K => {
            super::q4_k::interleave(bytemuck::cast_slice(&j.data[..split]), bpr, groups)
        }
        GgmlType::Q6_K => {
            super::q6_k::interleave(bytemuck::cast_slice(&j.data[..split]), bpr, groups)
        }
        _ => super::q8_0::interleave(bytemuck::cast_slice(&j.data[..split]), bpr, groups),
    }
    tail.copy_from_slice(&j.data[split..]);
}

/// Asks for `buf`'s whole 2 MiB pages to be huge pages when it is first written (where transparent huge pages
/// are on `madvise`, as on most distributions): ~350 page faults instead of ~180,000 for a model's weights, and
/// few TLB misses when they are streamed.
pub(crate) fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (p, end) = (
            buf.as_ptr() as usize,
            buf.as_ptr() as usize + size_of_val(buf),
        );
        let (first, last) = (p.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: advice on whole pages inside memory this slice borrows; it changes how they are backed,
            // never their contents.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

impl std::fmt::Debug for PackedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedArena({} bytes)", self.buf.len())
    }
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeights({:?}, {} bytes)", self.layout, self.len)
    }
}

/// A weight matrix: `rows` rows of `cols` weights in ggml blocks, borrowed from the model file or from its
/// packed copy, in `layout`.
#[derive(Clone, Copy, Debug)]
pub struct WeightRows<'a> {
    pub ty: GgmlType,
    pub layout: Layout,
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
    /// thread's share). An interleaved matrix splits only at its groups: each takes as many bytes as its rows
    /// do in the file, so the range is the same.
    pub fn sub_rows(&self, start: usize, len: usize) -> WeightRows<'a> {
        let n = self.row_bytes();
        if self.layout == Layout::Interleaved {
            let g = INTERLEAVE_ROWS;
            assert!(
                start.is_multiple_of(g) && (len.is_multiple_of(g) || start + len == self.rows),
                "rows {start}..{} of a matrix interleaved by {g}",
                start + len
            );
        }
        WeightRows {
            ty: self.ty,
            layout: self.layout,
            rows: len,
            cols: self.cols,
            data: &self.data[start * n..(start + len) * n],
        }
    }

    /// Dequantizes row `r` into `out` (the token embedding lookup), with the format crate's decoders; a row of an
    /// interleaved group is gathered back into its blocks first.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.layout == Layout::Rows || r >= self.rows / INTERLEAVE_ROWS * INTERLEAVE_ROWS {
            quarry_quantize::convert::decode_values(self.ty, self.row(r), out);
            return;
        }
        let group = &self.data[r / INTERLEAVE_ROWS * INTERLEAVE_ROWS * self.row_bytes()..];
        let at = r % INTERLEAVE_ROWS;
        let block_len = self.ty.block_len();
        let per_row = self.cols / block_len;
        for (b, out) in out[..self.cols].chunks_exact_mut(block_len).enumerate() {
            let mut decode =
                |bytes: &[u8]| quarry_quantize::convert::decode_values(self.ty, bytes, out);
            match self.ty {
                // IQ4_NL blocks are laid out as Q4_0's.
                GgmlType::Q4_0 | GgmlType::IQ4_NL => decode(bytemuck::bytes_of(
                    &super::q4_0::interleaved_block(group, per_row, at, b),
                )),
                GgmlType::IQ4_XS => decode(bytemuck::bytes_of(&super::iq4_xs::interleaved_block(
                    group, per_row, at, b,
                ))),
                GgmlType::Q4_K => decode(bytemuck::bytes_of(&super::q4_k::interleaved_block(
                    group, per_row, at, b,
                ))),
                GgmlType::Q6_K => decode(bytemuck::bytes_of(&super::q6_k::interleaved_block(
                    group, per_row, at, b,
                ))),
                _ => decode(bytemuck::bytes_of(&super::q8_0::interleaved_block(
                    group, per_row, at, b,
                ))),
            }
        }
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
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
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
    if w.layout == Layout::Interleaved && matches!(w.ty, GgmlType::Q4_K | GgmlType::Q6_K) {
        let gemm = k
            .interleaved_k_gemm(w.ty)
            .expect("matrices are interleaved only for sets that read them so");
        return gemm(data, acts.q8k, w.cols / QK_K, out);
    }
    if w.layout == Layout::Interleaved {
        let gemm = k
            .interleaved_gemm(w.ty)
            .expect("matrices are interleaved only for sets that read them so");
        return gemm(data, acts.q8, w.cols / 32, out);
    }
    match w.ty {
        GgmlType::Q8_0 => (k.gemm_q8_0)(cast(data), acts.q8, w.cols / 32, out),
        GgmlType::Q4_0 => (k.gemm_q4_0)(cast(data), acts.q8, w.cols / 32, out),
        GgmlType::IQ4_NL => (k.gemm_iq4_nl)(cast(data), acts.q8, w.cols / 32, out),
        GgmlType::IQ4_XS => (k.gemm_iq4_xs)(cast(data), acts.q8, w.cols / 32, out),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of an interleaved matrix (the token embedding of a model on a set that interleaves) dequantizes to
    /// exactly what the row as it lies in the file does, for every interleaved type, in whole groups and past
    /// them.
    #[test]
    fn interleaved_rows_dequantize_as_the_file_rows() {
        let (rows, cols) = (37, 512);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            // Arbitrary bytes with scales kept finite (an f16 scale's exponent below all-ones; Q4_K's `dmin`
            // too).
            let row_bytes = cols / ty.block_len() * ty.block_bytes();
            let mut data: Vec<u8> = (0..rows * row_bytes)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
                .collect();
            for block in data.chunks_exact_mut(ty.block_bytes()) {
                block[1] &= 0x3b;
                match ty {
                    GgmlType::Q4_K => block[3] &= 0x3b,
                    // Q6_K's `d` is its last two bytes.
                    GgmlType::Q6_K => block[209] &= 0x3b,
                    _ => {}
                }
            }
            let job = PackJob {
                layout: Layout::Interleaved,
                ty,
                rows,
                cols,
                data: &data,
            };
            let mut packed = vec![0u8; data.len()];
            pack(&job, &mut packed);
            let view = |data, layout| WeightRows {
                ty,
                layout,
                rows,
                cols,
                data,
            };
            let (file, interleaved) = (
                view(&data[..], Layout::Rows),
                view(&packed[..], Layout::Interleaved),
            );
            for r in 0..rows {
                let (mut want, mut got) = (vec![0.0f32; cols], vec![0.0f32; cols]);
                file.dequantize_row(r, &mut want);
                interleaved.dequantize_row(r, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ty} row {r}");
            }
        }
    }
}
