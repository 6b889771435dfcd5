//! Where a matrix product writes: a window of a token-major matrix.

use std::marker::PhantomData;
use std::ptr::NonNull;

/// The output of a product of `rows` weight rows with `tokens` activation rows: token `t`'s result for weight row
/// `r` lives at `t * stride + r` of a borrowed buffer, and nothing else in the buffer is touched.
///
/// Token-major is the layout everything after a product reads (the next norm, RoPE, attention, the experts'
/// combination), and `stride > rows` lets a product fill a column range of a wider matrix in place: a thread's
/// share of a matrix's rows, one projection of Q/K/V, one expert's tokens of a gathered batch. Two windows of one
/// buffer interleave in memory without sharing a value, which a pair of `&mut [f32]` could not express, so this
/// holds a pointer and hands out one token's values at a time ([`ProductOut::token`]) or, to the SIMD kernels, the
/// raw base pointer after they have checked their tile against [`ProductOut::tokens`] and
/// [`ProductOut::rows`].
pub struct ProductOut<'a> {
    ptr: NonNull<f32>,
    tokens: usize,
    rows: usize,
    stride: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `ProductOut` is an exclusive borrow of the values its window covers, like `&mut [f32]` (which is
// `Send`); windows that exist at the same time never share a value (`split_at_row`, and the promise of
// `window`).
unsafe impl Send for ProductOut<'_> {}
// SAFETY: through a shared `&ProductOut` only the shape can be read; values are reached through `&mut self`
// methods or the unsafe `window`, whose callers promise that the windows they hold at once are disjoint (how the
// parallel regions hand each work item its share).
unsafe impl Sync for ProductOut<'_> {}

impl<'a> ProductOut<'a> {
    /// `buf` as a compact `[tokens][rows]` matrix.
    ///
    /// # Panics
    /// When `buf` holds fewer than `tokens * rows` values.
    pub fn new(buf: &'a mut [f32], tokens: usize, rows: usize) -> ProductOut<'a> {
        Self::with_stride(buf, tokens, rows, rows)
    }

    /// `buf` as `tokens` rows of `rows` values, `stride` apart.
    ///
    /// # Panics
    /// When `stride < rows`, or `buf` is shorter than the `(tokens - 1) * stride + rows` values the window reaches.
    pub fn with_stride(
        buf: &'a mut [f32],
        tokens: usize,
        rows: usize,
        stride: usize,
    ) -> ProductOut<'a> {
        let reach = if tokens == 0 || rows == 0 {
            0
        } else {
            (tokens - 1) * stride + rows
        };
        assert!(
            stride >= rows && buf.len() >= reach,
            "an output of {} values cannot hold {tokens} tokens x {rows} rows at stride {stride}",
            buf.len()
        );
        ProductOut {
            ptr: NonNull::from(buf).cast(),
            tokens,
            rows,
            stride,
            _borrow: PhantomData,
        }
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Values per token: the weight rows of the product.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Distance between consecutive tokens' values.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Token `t`'s `rows` values.
    ///
    /// # Panics
    /// When `t >= tokens`.
    pub fn token(&mut self, t: usize) -> &mut [f32] {
        assert!(t < self.tokens, "token {t} of an output of {}", self.tokens);
        // SAFETY: the window's token `t` is `rows` values inside the borrowed buffer (checked at construction),
        // which no other live window shares; the `&mut self` borrow keeps this the only slice of them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(t * self.stride), self.rows) }
    }

    /// The position of token 0, row 0, for SIMD stores: a kernel may write `base.add(t * stride + r)` for every
    /// `t < tokens` and `r < rows` it has checked, and nothing else.
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr.as_ptr()
    }

    /// The same window for a shorter borrow (to hand to a kernel and use again afterwards).
    pub fn reborrow(&mut self) -> ProductOut<'_> {
        ProductOut {
            ptr: self.ptr,
            tokens: self.tokens,
            rows: self.rows,
            stride: self.stride,
            _borrow: PhantomData,
        }
    }

    /// Rows `0..at` and `at..rows`, as two windows.
    ///
    /// # Panics
    /// When `at > rows`.
    pub fn split_at_row(self, at: usize) -> (ProductOut<'a>, ProductOut<'a>) {
        assert!(at <= self.rows, "row {at} of an output of {}", self.rows);
        // SAFETY: both windows lie inside this one and share no value.
        unsafe {
            (
                self.window(0, self.tokens, 0, at),
                self.window(0, self.tokens, at, self.rows - at),
            )
        }
    }

    /// Tokens `t0..t0 + tokens` and rows `r0..r0 + rows` of this window.
    ///
    /// # Safety
    /// The windows taken from one `ProductOut` and alive at the same time must not overlap (the parallel regions
    /// hand each work item its own).
    ///
    /// # Panics
    /// When the window does not lie inside this one.
    pub(crate) unsafe fn window(
        &self,
        t0: usize,
        tokens: usize,
        r0: usize,
        rows: usize,
    ) -> ProductOut<'a> {
        assert!(
            t0 + tokens <= self.tokens && r0 + rows <= self.rows,
            "tokens {t0}+{tokens}, rows {r0}+{rows} outside an output of {} x {}",
            self.tokens,
            self.rows
        );
        let at = if tokens == 0 || rows == 0 {
            0
        } else {
            t0 * self.stride + r0
        };
        ProductOut {
            // SAFETY: `at` is inside the borrowed buffer (the window is inside this one, or empty).
            ptr: unsafe { self.ptr.add(at) },
            tokens,
            rows,
            stride: self.stride,
            _borrow: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_reach_only_their_own_values() {
        let mut buf: Vec<f32> = (0..30).map(|i| i as f32).collect();
        // 3 tokens x 4 rows at stride 10: values 0..4, 10..14, 20..24.
        let out = ProductOut::with_stride(&mut buf, 3, 4, 10);
        let (mut left, mut right) = out.split_at_row(1);
        assert_eq!((left.rows(), right.rows(), right.tokens()), (1, 3, 3));
        left.token(2)[0] = -1.0;
        right.token(0).fill(-2.0);
        // SAFETY: the only window alive.
        let mut inner = unsafe { right.window(1, 2, 1, 2) };
        inner.token(1).fill(-3.0);
        let touched: Vec<usize> = (0..30).filter(|&i| buf[i] < 0.0).collect();
        assert_eq!(touched, [1, 2, 3, 20, 22, 23]);
        assert_eq!(buf[20], -1.0);
    }

    #[test]
    #[should_panic(expected = "cannot hold 2 tokens x 4 rows at stride 5")]
    fn a_short_buffer_is_refused() {
        let mut buf = [0.0f32; 8];
        ProductOut::with_stride(&mut buf, 2, 4, 5);
    }

    #[test]
    #[should_panic(expected = "token 2 of an output of 2")]
    fn tokens_past_the_window_are_refused() {
        let mut buf = [0.0f32; 8];
        ProductOut::new(&mut buf, 2, 4).token(2);
    }
}
