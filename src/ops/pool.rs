//! A small pool of helper threads that spin briefly between jobs, for the decode kernels.
//!
//! A decode step is ~200 matmuls of tens to hundreds of microseconds each, separated by small
//! ops. Handed to rayon, each one woke a sleeping thread and often put the caller to sleep:
//! measured on 2 cores, ~10% of decode time went to the scheduler (futex wake-ups, context
//! switches) and the second core idled while the first one woke it. Here the caller publishes
//! a job, takes parts of it itself, and the helpers, which keep spinning for
//! [`SPIN`] after their last job, start on it within nanoseconds. After that they sleep on a
//! condition variable and cost nothing.
//!
//! One job runs at a time: a second caller (another engine in the same process, a test) that
//! finds the pool busy runs its parts on rayon instead, so callers never wait on each other.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper spins before it sleeps: longer than the gap between two matmuls
/// of a decode step, far shorter than the time between steps of an idle server.
const SPIN: Duration = Duration::from_micros(200);

/// Spinning threads offer their core to others this often (a `sched_yield`, which returns at
/// once when nothing else is runnable).
const YIELD_EVERY: u32 = 64;

type Job = dyn Fn(usize) + Sync;

/// A job as the helpers see it: the closure with its lifetime erased (see the safety note in
/// [`run`]), its part count and its generation.
#[derive(Clone, Copy)]
struct JobRef(*const Job, usize, u64);
// SAFETY: the pointee is `Sync`, and is only used while the job is live (see `run`).
unsafe impl Send for JobRef {}

struct Shared {
    /// High 32 bits: the job's generation; low 32 bits: the next part to claim.
    state: AtomicU64,
    /// The current job and its part count, written before the generation that announces them
    /// and valid until every part of it has completed.
    job: Mutex<Option<JobRef>>,
    completed: AtomicUsize,
    /// The first panic of a part of the current job, for `run` to re-raise.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleeping: AtomicUsize,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

pub struct Pool {
    shared: &'static Shared,
    helpers: usize,
    submit: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            job: Mutex::new(None),
            completed: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: AtomicUsize::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        }));
        let helpers = rayon::current_num_threads().saturating_sub(1);
        for i in 0..helpers {
            std::thread::Builder::new()
                .name(format!("dora-kernel-{i}"))
                .spawn(move || helper(shared))
                .expect("spawning a kernel helper thread");
        }
        Pool {
            shared,
            helpers,
            submit: Mutex::new(()),
        }
    })
}

/// Run `f(0)`, …, `f(parts - 1)` across the calling thread and the helpers; returns when all
/// have run. Parts may run in any order and on any thread.
pub fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    if parts <= 1 || p.helpers == 0 {
        (0..parts).for_each(f);
        return;
    }
    let Ok(_guard) = p.submit.try_lock() else {
        (0..parts).into_par_iter().for_each(f);
        return;
    };
    let s = p.shared;
    // Lifetime erasure: helpers call the job only for parts they claimed under this
    // generation, and this function returns only after every part has completed, so `f`
    // outlives every use of the pointer.
    let raw: *const (dyn Fn(usize) + Sync + '_) = f;
    // SAFETY: only the lifetime bound changes; the pointer's layout is the same.
    let raw: *const Job = unsafe { std::mem::transmute(raw) };
    // 32 bits of generation, wrapping (after ~4 billion jobs) back through 0.
    let generation = ((s.state.load(Ordering::Acquire) >> 32) + 1) & 0xffff_ffff;
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobRef(raw, parts, generation));
    s.completed.store(0, Ordering::SeqCst);
    s.state.store(generation << 32, Ordering::SeqCst);
    if s.sleeping.load(Ordering::SeqCst) > 0 {
        let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    work(s, generation, raw, parts);
    let mut spins = 0u32;
    // Every part completes, panicking or not (`work` catches panics), so this ends, and `f`
    // outlives every call of it even when one panicked.
    while s.completed.load(Ordering::Acquire) < parts {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(YIELD_EVERY) {
            // A helper may have been descheduled holding a part (another thread of the
            // process wanted this core): let it, or whoever runs, have the core.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
}

/// Claim and run parts of job `generation` until none are left. `f` is dereferenced only
/// after a claim under `generation` succeeded, which proves it is that generation's live job.
fn work(s: &Shared, generation: u64, f: *const Job, parts: usize) {
    loop {
        let cur = s.state.load(Ordering::Acquire);
        if cur >> 32 != generation || (cur & 0xffff_ffff) as usize >= parts {
            return;
        }
        if s.state
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let part = (cur & 0xffff_ffff) as usize;
            // SAFETY: the claim succeeded under `generation`, whose job `f` is and which
            // `run` keeps alive until this part completes.
            let call = std::panic::AssertUnwindSafe(|| unsafe { (*f)(part) });
            if let Err(payload) = std::panic::catch_unwind(call) {
                // Handed to the caller, which re-raises it once every part has completed.
                s.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(payload);
            }
            s.completed.fetch_add(1, Ordering::Release);
        }
    }
}

fn helper(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin first, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = s.state.load(Ordering::Acquire) >> 32;
            if g != seen {
                break g;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(YIELD_EVERY) {
                // Spinning must not starve the server's other threads (HTTP, streaming): on
                // 2 cores a helper that never yielded halved decode speed behind HTTP.
                std::thread::yield_now();
            }
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let guard = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                let g = s.state.load(Ordering::SeqCst) >> 32;
                if g == seen {
                    drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                } else {
                    drop(guard);
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            std::hint::spin_loop();
        };
        seen = generation;
        let Some(JobRef(f, parts, g)) = *s.job.lock().unwrap_or_else(|e| e.into_inner()) else {
            continue;
        };
        // A slow helper may find a later job stored already: it waits for that one's turn.
        if g == generation {
            work(s, generation, f, parts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_exactly_once_across_many_jobs_and_callers() {
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    for job in 0..300 {
                        let parts = 1 + (job + c) % 9;
                        let hits: Vec<AtomicUsize> =
                            (0..parts).map(|_| AtomicUsize::new(0)).collect();
                        run(parts, &|p| {
                            hits[p].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_keeps_working() {
        for _ in 0..20 {
            let hits: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(8, &|p| {
                    hits[p].fetch_add(1, Ordering::Relaxed);
                    if p == 3 {
                        panic!("part 3 fails");
                    }
                })
            }));
            assert!(caught.is_err(), "the panic is re-raised");
            // On the pool every part runs; on the rayon fallback (when another test holds the
            // pool) a panic may skip parts; never does one run twice.
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) <= 1));
            assert_eq!(hits[3].load(Ordering::Relaxed), 1);
        }
        // And the pool still works.
        let n = AtomicUsize::new(0);
        run(5, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }
}
