//! The [`Transport`] over MPI (rsmpi): `MPI_Ibcast` and `MPI_Reduce` on `MPI_COMM_WORLD`.
//!
//! Broadcasts are non-blocking so that a worker waiting for rank 0 can sleep. Open MPI
//! busy-polls inside a blocking collective: an idle server's workers would each keep most of a
//! core busy (about 70% here) for as long as no request comes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::{Error, Result, Transport};

/// Largest count of one MPI call (MPI counts are C `int`s); longer buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

/// How long a rank waiting for a broadcast polls without sleeping. It is longer than the gap
/// between two MoE layers of a running request (rank 0's attention), so a request running
/// waits no more than a blocking call would. Past it, the server is taken to be idle.
const POLL: Duration = Duration::from_millis(20);

/// Longest sleep between two polls once idle: the delay the first layer of the next request
/// may see.
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// MPI, initialised for this process: finalised when dropped. Keep it in `main` and drop it
/// last, after every model and worker that uses its [`MpiTransport`] (MPI must be finalised
/// by the thread that initialised it, after the last call).
pub struct Mpi {
    _universe: Universe,
    transport: Arc<MpiTransport>,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi").field("transport", &self.transport).finish()
    }
}

impl Mpi {
    /// Initialises MPI with calls allowed from any one thread at a time
    /// (`MPI_THREAD_SERIALIZED`: a server runs the model on its engine thread).
    ///
    /// # Errors
    /// [`Error::Transport`] when MPI is already initialised or cannot give that thread level.
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Transport("MPI is already initialised".into()))?;
        if !matches!(level, Threading::Serialized | Threading::Multiple) {
            return Err(Error::Transport(format!(
                "MPI gives thread level {level:?}; MPI_THREAD_SERIALIZED is needed"
            )));
        }
        let world = universe.world();
        let transport = Arc::new(MpiTransport {
            rank: world.rank() as usize,
            size: world.size() as usize,
            serial: Mutex::new(()),
        });
        Ok(Mpi {
            _universe: universe,
            transport,
        })
    }

    /// The transport over `MPI_COMM_WORLD`.
    pub fn transport(&self) -> Arc<MpiTransport> {
        self.transport.clone()
    }
}

/// [`Transport`] over `MPI_COMM_WORLD`. Calls are serialised by a lock, as
/// `MPI_THREAD_SERIALIZED` requires.
#[derive(Debug)]
pub struct MpiTransport {
    rank: usize,
    size: usize,
    serial: Mutex<()>,
}

impl MpiTransport {
    fn world(&self) -> Result<(std::sync::MutexGuard<'_, ()>, SimpleCommunicator)> {
        let guard = self
            .serial
            .lock()
            .map_err(|_| Error::Transport("a thread panicked inside an MPI call".into()))?;
        Ok((guard, SimpleCommunicator::world()))
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn broadcast(&self, buf: &mut [u32]) -> Result<()> {
        let (_serial, world) = self.world()?;
        let root = world.process_at_rank(0);
        for piece in buf.chunks_mut(MAX_COUNT) {
            // Every rank calls the non-blocking form: MPI does not match a blocking collective
            // with a non-blocking one.
            mpi::request::scope(|scope| {
                let mut request = root.immediate_broadcast_into(scope, piece);
                if self.rank == 0 {
                    request.wait();
                    return;
                }
                let started = Instant::now();
                let mut sleep = Duration::from_micros(10);
                loop {
                    match request.test() {
                        Ok(_) => return,
                        Err(pending) => request = pending,
                    }
                    if started.elapsed() < POLL {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(sleep);
                        sleep = (sleep * 2).min(MAX_SLEEP);
                    }
                }
            });
        }
        Ok(())
    }

    fn reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (_serial, world) = self.world()?;
        let root = world.process_at_rank(0);
        if self.rank == 0 {
            if recv.len() != send.len() {
                return Err(Error::Transport(format!(
                    "reduction of {} floats into {}",
                    send.len(),
                    recv.len()
                )));
            }
            for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
                root.reduce_into_root(s, r, SystemOperation::sum());
            }
        } else {
            for s in send.chunks(MAX_COUNT) {
                root.reduce_into(s, SystemOperation::sum());
            }
        }
        Ok(())
    }
}
