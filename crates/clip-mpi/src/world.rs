//! The MPI world: the collectives of [`Collective`] as MPI calls.

use std::sync::Mutex;

use anyhow::{bail, Result};
use clip_core::dist::Collective;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

/// This process's rank in MPI's world. MPI is initialised once per process ([`MpiWorld::init`])
/// and finalised when this is dropped.
pub struct MpiWorld {
    _universe: Universe,
    rank: usize,
    size: usize,
    /// One MPI call at a time (the library is asked for `MPI_THREAD_SERIALIZED`: the training
    /// step calls from whichever compute thread runs it).
    serial: Mutex<()>,
}

impl MpiWorld {
    /// Initialises MPI and installs a panic hook that aborts the whole job: a rank that panics
    /// would otherwise leave the others waiting in their next collective for ever.
    pub fn init() -> Result<Self> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
            bail!("MPI was already initialised in this process");
        };
        if threading < Threading::Serialized {
            bail!("the MPI library offers threading level {threading:?}; clipmine needs Serialized");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!("rank {rank} of {size} panicked; aborting every rank");
            previous(info);
            SimpleCommunicator::world().abort(101);
        }));
        Ok(Self {
            _universe: universe,
            rank,
            size,
            serial: Mutex::new(()),
        })
    }

    fn call<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> Result<R> {
        let Ok(_guard) = self.serial.lock() else {
            bail!("rank {}: an MPI call panicked", self.rank);
        };
        Ok(f(&SimpleCommunicator::world()))
    }
}

// SAFETY: every MPI call goes through `call`, one at a time, and the library was initialised
// with MPI_THREAD_SERIALIZED, which allows calls from any thread made one at a time.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let mut all = vec![0f32; local.len() * self.size];
        self.call(|w| w.all_gather_into(local, &mut all[..]))?;
        Ok(all)
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.call(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()))
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<()> {
        self.call(|w| w.process_at_rank(0).broadcast_into(buf))
    }

    fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
