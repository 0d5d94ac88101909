//! A small fork-join pool for the kernels' parallel sections.
//!
//! A decode step on bench-mid makes ~110 parallel kernel calls of 50-300 µs each. A general
//! work-stealing pool pays tens of microseconds per call to wake a worker that went to sleep
//! between calls, a fifth of the step. Here workers spin briefly on one atomic word after each
//! call, so the next call starts them in well under a microsecond, then yield, then park.
//!
//! The word packs `epoch | count | next`: a call publishes a new epoch with its task count;
//! threads claim tasks by compare-and-swap on that word, so a claim can only succeed for the
//! call that is still running, and that call's closure outlives every claimed task.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Pure spinning after a call, before yielding the core.
const SPIN: Duration = Duration::from_micros(50);
/// Spinning with yields (others may run) before parking.
const YIELD: Duration = Duration::from_millis(2);

const COUNT_BITS: u32 = 20;
const MAX_TASKS: usize = (1 << COUNT_BITS) - 1;
const FIELD: u64 = (1 << COUNT_BITS) - 1;

fn pack(epoch: u64, count: usize, next: usize) -> u64 {
    (epoch << (2 * COUNT_BITS)) | ((count as u64) << COUNT_BITS) | next as u64
}

fn unpack(s: u64) -> (u64, usize, usize) {
    (
        s >> (2 * COUNT_BITS),
        ((s >> COUNT_BITS) & FIELD) as usize,
        (s & FIELD) as usize,
    )
}

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Pool {
    /// `epoch | count | next`.
    state: AtomicU64,
    /// The running call's `&Task`, valid while a claimed task of it is unfinished.
    job: AtomicPtr<()>,
    /// Tasks of the running call finished (or panicked).
    done: AtomicUsize,
    panicked: AtomicBool,
    /// Held by the thread running a call; others (and nested calls) run inline.
    busy: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Threads taking part in a call, the caller included.
    threads: usize,
    /// Workers that have started running.
    started: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = rayon::current_num_threads().max(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            threads,
            started: AtomicUsize::new(0),
        }));
        let mut spawned = 0;
        for i in 1..threads {
            let worker = std::thread::Builder::new()
                .name(format!("llama4-kernel-{i}"))
                .spawn(move || {
                    pool.started.fetch_add(1, Ordering::Release);
                    pool.work()
                });
            // Without the thread, calls still complete: the caller claims every task.
            spawned += usize::from(worker.is_ok());
        }
        // Wait until every worker runs: a thread allocates as it starts (its name, for the
        // stack-overflow handler), and that should happen here, not during some later call
        // that is meant to allocate nothing.
        while pool.started.load(Ordering::Acquire) < spawned {
            std::thread::yield_now();
        }
        pool
    })
}

/// A pointer the tasks of one call share, each reaching only its own disjoint part of the
/// pointee (an output's rows, a slot per task): what [`run`]'s `Fn + Sync` tasks need to write
/// into one buffer. Dereferencing it stays `unsafe`; the caller's SAFETY comment says why the
/// parts are disjoint.
pub struct SyncPtr<T>(pub *mut T);

impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SyncPtr<T> {}

// SAFETY: sharing the address gives no access by itself; every dereference is an `unsafe`
// block of a caller whose tasks reach disjoint elements, and `T` may be sent.
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Threads that run a call's tasks (the caller and the pool's workers).
pub fn threads() -> usize {
    pool().threads
}

/// Runs `f(i)` for every `i` in `0..count` on the pool and the calling thread, returning when
/// all have finished. Calls made while another is running (from a task, or another thread)
/// run inline on their thread. A panic in a task is re-raised here after the others finish.
pub fn run(count: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    if count <= 1
        || p.threads == 1
        || count > MAX_TASKS
        || p.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        (0..count).for_each(f);
        return;
    }
    let job: Task = f;
    p.job.store(&job as *const Task as *mut (), Ordering::Relaxed);
    p.done.store(0, Ordering::Relaxed);
    p.panicked.store(false, Ordering::Relaxed);
    let (epoch, _, _) = unpack(p.state.load(Ordering::Relaxed));
    let epoch = epoch + 1;
    p.state.store(pack(epoch, count, 0), Ordering::SeqCst);
    if p.sleepers.load(Ordering::SeqCst) > 0 {
        let _guard = p.lock.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    p.claim(epoch);
    // A worker may have been descheduled mid-task (another process wants the core): after a
    // short spin, yield so that it can run here.
    let wait = Instant::now();
    while p.done.load(Ordering::Acquire) < count {
        if wait.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    p.job.store(std::ptr::null_mut(), Ordering::Relaxed);
    let panicked = p.panicked.load(Ordering::Relaxed);
    p.busy.store(false, Ordering::Release);
    if panicked {
        panic!("a parallel kernel task panicked");
    }
}

impl Pool {
    /// Claims and runs tasks of call `epoch` until none is left.
    fn claim(&self, epoch: u64) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (e, count, next) = unpack(s);
            if e != epoch || next >= count {
                return;
            }
            match self.state.compare_exchange_weak(
                s,
                pack(e, count, next + 1),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: task `next` of this epoch is claimed and unfinished, so the call
                    // that published the epoch is still waiting and its `&Task` is alive.
                    let job = unsafe { *(self.job.load(Ordering::Relaxed) as *const Task) };
                    if panic::catch_unwind(AssertUnwindSafe(|| job(next))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    s = self.state.load(Ordering::Acquire);
                }
                Err(now) => s = now,
            }
        }
    }

    /// A worker: wait for a new epoch, help with it, repeat.
    fn work(&self) {
        let mut seen = unpack(self.state.load(Ordering::Acquire)).0;
        loop {
            let idle = Instant::now();
            let epoch = loop {
                let e = unpack(self.state.load(Ordering::Acquire)).0;
                if e != seen {
                    break e;
                }
                let waited = idle.elapsed();
                if waited < SPIN {
                    std::hint::spin_loop();
                } else if waited < YIELD {
                    std::thread::yield_now();
                } else {
                    let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, Ordering::SeqCst);
                    while unpack(self.state.load(Ordering::SeqCst)).0 == seen {
                        guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                }
            };
            seen = epoch;
            self.claim(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for count in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            run(count, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "count {count}"
            );
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        run(4, &|_| {
                            run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 4 * 3);
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_recovers() {
        let r = panic::catch_unwind(|| run(4, &|i| assert!(i != 2, "task 2 fails")));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        run(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn workers_wake_after_parking() {
        let n = AtomicUsize::new(0);
        run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(YIELD * 3);
        run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
