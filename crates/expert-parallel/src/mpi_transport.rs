//! The [`Transport`] over MPI (rsmpi): `MPI_Bcast` and `MPI_Reduce` on `MPI_COMM_WORLD`.

use std::sync::{Arc, Mutex};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::{Error, Result, Transport};

/// Largest count of one MPI call (MPI counts are C `int`s); longer buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

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
            root.broadcast_into(piece);
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
