//! Where a thread's stream of weights goes after the matrix a product kernel was given.
//!
//! The row-lane kernels request their weights `AHEAD` bytes before they read them (`x86::row_lanes`,
//! `x86::k_row_lanes`). Near the end of a call those requests run past its slice of rows, into whatever the file
//! holds next: for an expert's last rows that is usually an expert no token chose, and the thread's next call
//! then starts on lines nobody asked for. A region's items are a thread's calls one after another (`parallel`),
//! so before each the region names the slice the thread will most likely read next, and the requests that
//! would fall past the end go to that slice's first bytes instead. Measured on full-size synthetic models,
//! `quarry bench -p 0 -n 128 -t 2`, alternating runs: Q4_K_M 81-83 -> 89-90 tok/s, Q8_0 57-58 -> 60-61, Q4_0
//! 87-91 -> 92-93; 8 sequences (Q4_0) 207-211 -> 219-221, 16 sequences 295-306 -> 315-318.
//!
//! A hint only: a kernel never reads through it (prefetches never fault), so a wrong guess costs bandwidth,
//! never a result. It is thread-local because the kernels' signatures describe what they compute, and
//! this is about what the thread does after.

use std::cell::Cell;

thread_local! {
    /// The next slice, set for the coming kernel call and taken by it.
    static NEXT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Names `next` as the slice this thread reads after its coming product call (empty: nothing known).
pub(crate) fn continue_with(next: &[u8]) {
    NEXT.set((next.as_ptr() as usize, next.len()));
}

/// Where a kernel call's prefetches go: inside its own slice, then on into the next one. (Only the x86 row lanes
/// prefetch; elsewhere the hint is set and dropped.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamEnd {
    end: usize,
    next: usize,
    next_len: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl StreamEnd {
    /// The stream of a call over `w`, taking the next slice named for it (so a hint serves one call only).
    pub(crate) fn of(w: &[u8]) -> StreamEnd {
        let (next, next_len) = NEXT.replace((0, 0));
        StreamEnd {
            end: w.as_ptr() as usize + w.len(),
            next,
            next_len,
        }
    }

    /// The address to request for stream offset `p` (an address in or past the call's slice): itself inside the
    /// slice, the same distance into the next slice past its end, none past both.
    #[inline(always)]
    pub(crate) fn ahead(&self, p: usize) -> Option<*const i8> {
        if p < self.end {
            return Some(p as *const i8);
        }
        let past = p - self.end;
        (past < self.next_len).then_some((self.next + past) as *const i8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_end_go_into_the_next_slice_once() {
        let (a, b) = ([0u8; 256], [0u8; 128]);
        continue_with(&b);
        let s = StreamEnd::of(&a);
        let (a0, b0) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert_eq!(s.ahead(a0 + 10), Some((a0 + 10) as *const i8));
        assert_eq!(s.ahead(a0 + 256 + 64), Some((b0 + 64) as *const i8));
        assert_eq!(s.ahead(a0 + 256 + 128), None);
        // The hint was taken: the next call continues nowhere.
        let t = StreamEnd::of(&a);
        assert_eq!(t.ahead(a0 + 255), Some((a0 + 255) as *const i8));
        assert_eq!(t.ahead(a0 + 256), None);
    }
}
