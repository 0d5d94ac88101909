//! The collective operations the protocol runs over, and an in-process group of threads that
//! provides them for tests.

use std::fmt::Debug;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::{Error, Result};

/// The two collective operations expert parallelism needs, rooted at rank 0. Every process of
/// the group calls the same operations in the same order with the same lengths, as MPI
/// requires of collectives: the protocol ([`crate::Leader`], [`crate::ExpertWorker`]) keeps
/// to that.
///
/// Implemented over MPI (`MpiTransport`, feature `mpi`) and by [`LocalGroup`]'s threads.
pub trait Transport: Send + Sync + Debug {
    /// This process's rank, `0 .. size()`.
    fn rank(&self) -> usize;

    /// Processes in the group.
    fn size(&self) -> usize;

    /// Copies rank 0's `buf` into every other process's `buf`.
    fn broadcast(&self, buf: &mut [u32]) -> Result<()>;

    /// The element-wise sum over all processes of `send`, into rank 0's `recv` (of the same
    /// length; ignored on other ranks, where it may be empty).
    fn reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
}

/// A group of `size` transports for threads of one process: the protocol and its numerics
/// tested without MPI. Rank 0 sums contributions in rank order.
///
/// A process that does not arrive at a collective within the timeout (a test that failed on
/// one thread) makes the others' calls fail with [`Error::Transport`] instead of waiting for
/// ever.
#[derive(Debug)]
pub struct LocalGroup;

impl LocalGroup {
    /// The transports of ranks `0 .. size`, one per thread.
    #[allow(clippy::new_ret_no_self)] // a group is its members' transports
    pub fn new(size: usize) -> Vec<Arc<dyn Transport>> {
        Self::with_timeout(size, Duration::from_secs(60))
    }

    /// [`LocalGroup::new`] with the time a collective waits for the others.
    pub fn with_timeout(size: usize, timeout: Duration) -> Vec<Arc<dyn Transport>> {
        let shared = Arc::new(Shared {
            size,
            timeout,
            barrier: Mutex::new(BarrierState::default()),
            arrived: Condvar::new(),
            words: Mutex::new(Vec::new()),
            sums: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| {
                Arc::new(LocalTransport {
                    rank,
                    shared: shared.clone(),
                }) as Arc<dyn Transport>
            })
            .collect()
    }
}

#[derive(Debug)]
struct LocalTransport {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    barrier: Mutex<BarrierState>,
    arrived: Condvar,
    /// Rank 0's broadcast buffer.
    words: Mutex<Vec<u32>>,
    /// Each rank's contribution to a reduction.
    sums: Mutex<Vec<Vec<f32>>>,
}

#[derive(Debug, Default)]
struct BarrierState {
    waiting: usize,
    generation: u64,
    /// Set once a wait timed out: the group is unusable from then on.
    broken: bool,
}

impl Shared {
    /// Waits until every rank has called `wait` for this generation.
    fn wait(&self) -> Result<()> {
        let lost = || Error::Transport("a process of the local group did not arrive".into());
        let mut st = self.barrier.lock().map_err(|_| lost())?;
        if st.broken {
            return Err(lost());
        }
        let generation = st.generation;
        st.waiting += 1;
        if st.waiting == self.size {
            st.waiting = 0;
            st.generation += 1;
            self.arrived.notify_all();
            return Ok(());
        }
        while st.generation == generation {
            let (next, timeout) = self.arrived.wait_timeout(st, self.timeout).map_err(|_| lost())?;
            st = next;
            if timeout.timed_out() && st.generation == generation {
                st.broken = true;
                self.arrived.notify_all();
                return Err(lost());
            }
            if st.broken {
                return Err(lost());
            }
        }
        Ok(())
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Transport("a thread of the local group panicked".into())
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn broadcast(&self, buf: &mut [u32]) -> Result<()> {
        let s = &self.shared;
        if self.rank == 0 {
            let mut words = s.words.lock().map_err(poisoned)?;
            words.clear();
            words.extend_from_slice(buf);
        }
        s.wait()?;
        if self.rank != 0 {
            let words = s.words.lock().map_err(poisoned)?;
            if words.len() != buf.len() {
                return Err(Error::Transport(format!(
                    "broadcast of {} words received into {}",
                    words.len(),
                    buf.len()
                )));
            }
            buf.copy_from_slice(&words);
        }
        // Rank 0 must not overwrite the buffer before everyone has read it.
        s.wait()
    }

    fn reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let s = &self.shared;
        {
            let mut sums = s.sums.lock().map_err(poisoned)?;
            sums[self.rank].clear();
            sums[self.rank].extend_from_slice(send);
        }
        s.wait()?;
        let mut result = Ok(());
        if self.rank == 0 {
            let sums = s.sums.lock().map_err(poisoned)?;
            if sums.iter().any(|v| v.len() != recv.len()) {
                result = Err(Error::Transport("reduction of unequal lengths".into()));
            } else {
                recv.copy_from_slice(&sums[0]);
                for part in &sums[1..] {
                    recv.iter_mut().zip(part).for_each(|(r, &v)| *r += v);
                }
            }
        }
        s.wait()?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_reduce_across_threads() {
        let group = LocalGroup::new(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let mut words = if t.rank() == 0 { vec![7, 8] } else { vec![0, 0] };
                    t.broadcast(&mut words).unwrap();
                    let mut sum = vec![0.0; 2];
                    let mine = [t.rank() as f32, 1.0];
                    t.reduce_sum(&mine, &mut sum).unwrap();
                    (t.rank(), words, sum)
                })
            })
            .collect();
        for h in handles {
            let (rank, words, sum) = h.join().unwrap();
            assert_eq!(words, [7, 8]);
            if rank == 0 {
                assert_eq!(sum, [3.0, 3.0]);
            }
        }
    }

    #[test]
    fn a_missing_process_is_an_error_not_a_hang() {
        let group = LocalGroup::with_timeout(2, Duration::from_millis(50));
        let mut words = [1u32];
        let err = group[0].broadcast(&mut words).unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err}");
        // The group stays broken.
        assert!(group[1].broadcast(&mut words).is_err());
    }
}
