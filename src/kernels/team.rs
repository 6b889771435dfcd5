//! A fork-join team that stays together for one forward pass: the pool's other threads wait for the pass's
//! parallel regions by polling instead of going back to rayon between them.
//!
//! Why: a forward pass is ~150 regions of 0.1-1 ms each, separated by a few microseconds to tens of microseconds
//! of serial work (norms, routing, gathering the experts' tokens). A rayon worker that finds nothing to do yields
//! for a few tens of microseconds and then sleeps on a futex; waking it is an inter-processor interrupt to a
//! halted vCPU, tens of microseconds more on a VM. Measured on this project's 2-vCPU machine, 16 sequences
//! decoding together: the helper thread started each region ~54 µs after the caller, ~6 ms of one thread's time
//! per 59 ms step. A team member polls a word instead and joins a region within a microsecond.
//!
//! The protocol: the caller publishes a region as one atomic word per member (generation, first and end of that
//! member's contiguous share of the items) after the work pointer. Each member, the caller included, claims
//! items from the front of its own share, in order, so that it streams one run of rows after another as the
//! rayon split it replaces did (claiming items alternately cost single-sequence decode ~1%), and is told the item
//! after the one it claimed, so that its prefetches can run on into it (`kernels::stream`); a member whose
//! share is empty takes items from the back of the others'. Claims are compare-and-swaps on words that carry
//! the generation, so a member still holding a previous region's view can never claim an item of the next; the
//! caller returns once every item is done, so the work (borrowed from its stack) outlives every call of it. A
//! panic in an item is caught where it happens and resumed on the caller once the region is over.
//!
//! Members poll with `pause` for a while, then yield between polls, so that a team on a busy machine (tests
//! running side by side) hands its CPU to whoever can use it instead of spinning against them.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// One region's work: a thin pointer to it fits an atomic.
struct Region<'a> {
    work: &'a (dyn Fn(usize, Option<usize>) + Sync),
}

/// A segment word: the region's generation in the high 32 bits, then the segment's first unclaimed item and
/// the end of its unclaimed items (16 bits each).
const ITEM_BITS: u32 = 16;
const MAX_ITEMS: usize = (1 << ITEM_BITS) - 1;

/// Members beyond this many take no segment of their own (they only take items from the others' ends).
const MAX_SEGMENTS: usize = 64;

fn word(generation: u32, front: usize, back: usize) -> u64 {
    ((generation as u64) << 32) | ((front as u64) << ITEM_BITS) | back as u64
}

fn generation(w: u64) -> u32 {
    (w >> 32) as u32
}

fn front(w: u64) -> usize {
    ((w >> ITEM_BITS) & MAX_ITEMS as u64) as usize
}

fn back(w: u64) -> usize {
    (w & MAX_ITEMS as u64) as usize
}

/// Which end of a segment a claim takes.
#[derive(Clone, Copy)]
enum End {
    /// The owner's: its items in order, one contiguous run of memory after another.
    Front,
    /// Anyone else's, once their own segment is empty.
    Back,
}

struct Team {
    /// The generation of the region being run, for the members to notice a new one.
    current: AtomicU64,
    /// Member `m`'s share of the region's items, `m * n / members` onwards (the first `members` words).
    segments: [AtomicU64; MAX_SEGMENTS],
    members: usize,
    work: AtomicPtr<Region<'static>>,
    done: AtomicUsize,
    stop: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Team {
    fn new(members: usize) -> Team {
        Team {
            current: AtomicU64::new(0),
            segments: [const { AtomicU64::new(0) }; MAX_SEGMENTS],
            members: members.min(MAX_SEGMENTS),
            work: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// Claims an item of segment `s` of generation `g` from `end`, if it has any left; and from the front, the
    /// item after it, which the claimer takes next unless another member takes it first.
    fn claim_from(&self, s: usize, g: u32, end: End) -> Option<(usize, Option<usize>)> {
        let segment = &self.segments[s];
        let mut w = segment.load(Ordering::Acquire);
        loop {
            if generation(w) != g || front(w) >= back(w) {
                return None;
            }
            let (item, next, claimed) = match end {
                End::Front => (
                    front(w),
                    (front(w) + 1 < back(w)).then_some(front(w) + 1),
                    word(g, front(w) + 1, back(w)),
                ),
                End::Back => (back(w) - 1, None, word(g, front(w), back(w) - 1)),
            };
            match segment.compare_exchange_weak(w, claimed, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((item, next)),
                Err(now) => w = now,
            }
        }
    }

    /// Member `m`'s next item of generation `g` (and the one after it, if known): from the front of its own
    /// segment, then from the back of the others'.
    fn claim(&self, m: usize, g: u32) -> Option<(usize, Option<usize>)> {
        let n = self.members;
        if m < n
            && let Some(claimed) = self.claim_from(m, g, End::Front)
        {
            return Some(claimed);
        }
        (1..=n).find_map(|k| self.claim_from((m + k) % n, g, End::Back))
    }

    /// Runs item `i` of the published region (claimed by this thread, `next` likely its next) and counts it
    /// done.
    fn run(&self, (i, next): (usize, Option<usize>)) {
        // SAFETY: an item was claimed in the region's generation, so the caller is still inside `run_region`
        // (it waits for every claimed item), and the pointer it stored before publishing is live.
        let region = unsafe { &*self.work.load(Ordering::Acquire) };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (region.work)(i, next))) {
            let mut slot = self.panic.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(payload);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Member `m` (the caller is 0): takes items of whatever region is published until told to stop. Between
    /// regions it reads only the generation, which the caller writes once per region.
    fn member(&self, m: usize) {
        let mut idle = Poll::default();
        let mut finished = None;
        while !self.stop.load(Ordering::Acquire) {
            let g = self.current.load(Ordering::Acquire) as u32;
            if finished == Some(g) {
                idle.wait();
                continue;
            }
            while let Some(claimed) = self.claim(m, g) {
                self.run(claimed);
            }
            finished = Some(g);
            idle = Poll::default();
        }
    }
}

/// Polling that starts with `pause` and turns to yielding the CPU once it has waited a while (~100 µs).
#[derive(Default)]
struct Poll(u32);

impl Poll {
    const PAUSES: u32 = 2000;

    fn wait(&mut self) {
        if self.0 < Self::PAUSES {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

thread_local! {
    /// The team this thread leads, while it runs a pass inside [`with_team`].
    static LEADING: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with the pool's other threads as a team: [`run_region`] calls inside it (on the thread running it)
/// share their items among them. Without other threads (a pool of one, or every worker busy) the items simply
/// run on that thread. `f` must not wait on other rayon work: the members hold their workers until it returns.
/// Nothing is allocated: the members are `rayon::join` jobs on the stack.
pub fn with_team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 || !LEADING.get().is_null() {
        return f();
    }
    let team = Team::new(threads);
    struct Lead<'t>(&'t Team);
    impl Drop for Lead<'_> {
        // Also on unwinding: the members must leave before the team is dropped.
        fn drop(&mut self) {
            LEADING.set(std::ptr::null());
            self.0.stop.store(true, Ordering::Release);
        }
    }
    let (r, ()) = rayon::join(
        || {
            LEADING.set(&team);
            let _lead = Lead(&team);
            f()
        },
        || crew(&team, 1, threads),
    );
    r
}

/// Members `first..end`, each on the thread that takes its job: the first here, the rest offered to the others.
fn crew(team: &Team, first: usize, end: usize) {
    if first + 1 == end {
        team.member(first);
    } else if first + 1 < end {
        rayon::join(|| team.member(first), || crew(team, first + 1, end));
    }
}

/// Runs `work(i, next)` for every `i` in `0..n_items` on the team this thread leads, each member taking its own
/// contiguous share first and then what is left of the others'; `next` is the item the member will most likely
/// run after `i` (for prefetching: another member may take it first), `None` when it cannot tell. Returns false,
/// having run nothing, when there is no team or more items than a segment word counts.
pub fn run_region(n_items: usize, work: &(dyn Fn(usize, Option<usize>) + Sync)) -> bool {
    let team = LEADING.get();
    if team.is_null() || n_items > MAX_ITEMS {
        return false;
    }
    // SAFETY: `with_team` keeps the team alive and this pointer set only while its `f` runs on this thread.
    let team = unsafe { &*team };
    let region = Region { work };
    let g = (team.current.load(Ordering::Relaxed) as u32).wrapping_add(1);
    team.done.store(0, Ordering::Relaxed);
    // The lifetime is erased for the members; `run` dereferences it only for items claimed in this generation,
    // and this function does not return before all of them are done.
    team.work.store(
        &region as *const Region as *mut Region<'static>,
        Ordering::Release,
    );
    let members = team.members;
    for (m, segment) in team.segments[..members].iter().enumerate() {
        segment.store(
            word(g, m * n_items / members, (m + 1) * n_items / members),
            Ordering::Release,
        );
    }
    team.current.store(g as u64, Ordering::Release);
    while let Some(claimed) = team.claim(0, g) {
        team.run(claimed);
    }
    let mut idle = Poll::default();
    while team.done.load(Ordering::Acquire) < n_items {
        idle.wait();
    }
    let payload = team.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(payload) = payload {
        resume_unwind(payload);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_once_in_every_region() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            with_team(|| {
                for n in [0usize, 1, 2, 7, 64, 1000] {
                    let counts: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                    assert!(run_region(n, &|i, _| {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }));
                    assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                }
            })
        });
    }

    #[test]
    fn the_members_take_part() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let threads = pool.install(|| {
            with_team(|| {
                let seen = Mutex::new(std::collections::HashSet::new());
                for _ in 0..200 {
                    run_region(8, &|_, _| {
                        seen.lock().unwrap().insert(std::thread::current().id());
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    });
                }
                seen.into_inner().unwrap().len()
            })
        });
        assert_eq!(threads, 2, "the second thread never joined a region");
    }

    #[test]
    fn the_next_item_named_is_the_one_the_member_runs_next_unless_another_took_it() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            with_team(|| {
                for n in [2usize, 5, 16, 64] {
                    let runs = Mutex::new(Vec::new());
                    run_region(n, &|i, next| {
                        let me = std::thread::current().id();
                        runs.lock().unwrap().push((me, i, next));
                    });
                    let runs = runs.into_inner().unwrap();
                    for (k, &(me, i, next)) in runs.iter().enumerate() {
                        let Some(next) = next else { continue };
                        assert!(next > i && next < n, "item {i} named {next} of {n}");
                        // The member's following run, if it had one, is the item named, or that item ran elsewhere.
                        let followed = runs[k + 1..].iter().find(|r| r.0 == me).map(|r| r.1);
                        let taken_elsewhere = runs.iter().any(|r| r.1 == next && r.0 != me);
                        assert!(
                            followed == Some(next) || taken_elsewhere,
                            "item {i} named {next}, then ran {followed:?}"
                        );
                    }
                }
            })
        });
    }

    #[test]
    fn a_panic_in_an_item_reaches_the_caller_after_the_region() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let finished = AtomicU32::new(0);
        let caught = pool.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                with_team(|| {
                    run_region(16, &|i, _| {
                        if i == 3 {
                            panic!("item three");
                        }
                        finished.fetch_add(1, Ordering::Relaxed);
                    })
                })
            }))
        });
        let payload = caught.expect_err("the panic was lost");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"item three"));
        assert_eq!(finished.load(Ordering::Relaxed), 15);
        // The pool is whole again: a team forms and works after the panic.
        let n = pool.install(|| {
            with_team(|| {
                let c = AtomicU32::new(0);
                run_region(10, &|_, _| {
                    c.fetch_add(1, Ordering::Relaxed);
                });
                c.load(Ordering::Relaxed)
            })
        });
        assert_eq!(n, 10);
    }

    #[test]
    fn without_a_team_nothing_runs_here() {
        assert!(!run_region(4, &|_, _| unreachable!()));
    }
}
