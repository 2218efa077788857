//! Data-parallel training across processes and machines over MPI.
//!
//! `mpirun -np N PROGRAM …` (Open MPI, MPICH) or Slurm's `srun` starts N copies of a program;
//! [`connect`] makes each one a rank of a [`clip_core::dist::Collective`] world, which
//! `clip_core::train::train_step_data_parallel` uses. The MPI library is the communication
//! engine clusters already have (with their fast interconnects), through the `mpi` crate: built
//! with feature `mpi` only, so that the default build needs no MPI installation. Without it, a
//! program started by a launcher as one rank of several says so and stops, rather than training
//! N copies of the same run side by side.

use anyhow::{bail, Result};
use clip_core::dist::{Collective, Solo};

#[cfg(feature = "mpi")]
mod world;

#[cfg(feature = "mpi")]
pub use world::MpiWorld;

/// Whether this build can join an MPI world (feature `mpi`).
pub const WITH_MPI: bool = cfg!(feature = "mpi");

/// One line on the world this process sees and whether this build can join it (stage 1 prints it).
pub fn describe_world() -> String {
    let build = if WITH_MPI {
        "this build has MPI (feature mpi)"
    } else {
        "this build has no MPI (build with --features mpi to run as ranks of mpirun or srun)"
    };
    match launch() {
        None => format!("world: one process, no launcher; {build}"),
        Some(l) => format!(
            "world: rank {} of {}, started by {}; {build}",
            l.rank, l.size, l.launcher
        ),
    }
}

/// How this process was started, as its launcher's environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// `mpirun` (Open MPI), `mpiexec` (MPICH and others, through PMI), `srun` (Slurm) or
    /// `torchrun` (PyTorch's, whose ranks would talk through NCCL: refused, see [`connect`]).
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
}

/// The launcher that started this process as one rank of a world, if one did: Open MPI's
/// `OMPI_COMM_WORLD_*`, PMI's `PMI_RANK`/`PMI_SIZE` (MPICH's Hydra), Slurm's
/// `SLURM_PROCID`/`SLURM_NTASKS`, torchrun's `RANK`/`WORLD_SIZE` (with its `LOCAL_RANK`, as
/// those two names alone are too common to mean a launcher).
pub fn launch() -> Option<Launch> {
    launch_from(|k| std::env::var(k).ok())
}

/// [`launch`] over any environment (`var` reads one variable).
pub fn launch_from(var: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let pairs = [
        ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("mpiexec", "PMI_RANK", "PMI_SIZE"),
        ("srun", "SLURM_PROCID", "SLURM_NTASKS"),
        ("torchrun", "RANK", "WORLD_SIZE"),
    ];
    pairs.into_iter().find_map(|(launcher, rank, size)| {
        if launcher == "torchrun" {
            var("LOCAL_RANK")?;
        }
        let rank = var(rank)?.trim().parse().ok()?;
        let size = var(size)?.trim().parse().ok()?;
        Some(Launch { launcher, rank, size })
    })
}

/// Shares this machine's cores among the ranks a launcher started on it, before any thread pool
/// exists: unless `RAYON_NUM_THREADS` is set, each rank computes with `SLURM_CPUS_PER_TASK`
/// threads under Slurm, else with the cores divided by the ranks on this machine (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's `MPI_LOCALNRANKS`): N ranks of N threads each on one
/// machine would fight over its cores. Returns the threads it chose, if it chose.
pub fn share_cores() -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let threads = threads_per_rank(
        |k| std::env::var(k).ok(),
        std::thread::available_parallelism().ok()?.get(),
    )?;
    // Before any other thread runs: the first thing a rank does.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Some(threads)
}

/// The threads each rank on this machine should compute with, as [`share_cores`] chooses them
/// (`var` reads one variable, `cores` counts this machine's).
pub fn threads_per_rank(var: impl Fn(&str) -> Option<String>, cores: usize) -> Option<usize> {
    let number = |k: &str| var(k)?.trim().parse::<usize>().ok().filter(|&n| n > 0);
    if let Some(n) = number("SLURM_CPUS_PER_TASK") {
        return Some(n);
    }
    let local = number("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| number("MPI_LOCALNRANKS"))?;
    Some((cores / local).max(1))
}

/// This process's world: one alone ([`Solo`]) when no launcher started it or it started one
/// rank; else MPI's, checked against what the launcher said. An error, with what to do, when a
/// launcher started several ranks and this build has no MPI.
///
/// torchrun's ranks are refused: they expect NCCL between GPUs, which clipmine does not have yet
/// (rather than N copies training side by side into one run folder).
pub fn connect() -> Result<Box<dyn Collective>> {
    match launch() {
        None => Ok(Box::new(Solo)),
        Some(l) if l.size <= 1 => Ok(Box::new(Solo)),
        Some(l) if l.launcher == "torchrun" => bail!(torchrun_refusal(&l)),
        Some(l) => world_of(l),
    }
}

/// Why torchrun's ranks cannot train together here, and what can.
fn torchrun_refusal(l: &Launch) -> String {
    format!(
        "torchrun started this program as rank {} of {}: its ranks would talk through NCCL, which clipmine does not have yet (feature nccl is not written); on CPUs, run the ranks with `mpirun -np {}` or `srun` and a build with `--features mpi`, or train in one process",
        l.rank, l.size, l.size
    )
}

#[cfg(feature = "mpi")]
fn world_of(l: Launch) -> Result<Box<dyn Collective>> {
    let world = MpiWorld::init()?;
    if (world.rank(), world.size()) != (l.rank, l.size) {
        bail!(
            "{} started rank {} of {}, but MPI says rank {} of {}: is the program launched through the MPI library it was built with (with srun: --mpi=pmix)?",
            l.launcher,
            l.rank,
            l.size,
            world.rank(),
            world.size()
        );
    }
    Ok(Box::new(world))
}

#[cfg(not(feature = "mpi"))]
fn world_of(l: Launch) -> Result<Box<dyn Collective>> {
    bail!(
        "{} started this program as rank {} of {}, but it was built without MPI: build it with `--features mpi` (it needs an MPI library and libclang: apt-get install openmpi-bin libopenmpi-dev libclang-dev)",
        l.launcher,
        l.rank,
        l.size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_launchers_variables_name_the_rank_and_the_world() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let open_mpi = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!(
            launch_from(open_mpi),
            Some(Launch {
                launcher: "mpirun",
                rank: 1,
                size: 4
            })
        );
        let slurm = env(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8")]);
        assert_eq!(
            launch_from(slurm).map(|l| (l.launcher, l.rank, l.size)),
            Some(("srun", 3, 8))
        );
        let hydra = env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]);
        assert_eq!(launch_from(hydra).map(|l| l.launcher), Some("mpiexec"));
        assert_eq!(launch_from(env(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")])), None);
        let torchrun = env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]);
        assert_eq!(
            launch_from(torchrun).map(|l| (l.launcher, l.rank, l.size)),
            Some(("torchrun", 1, 2))
        );
        // RANK and WORLD_SIZE alone are too common to mean torchrun; MPI's variables come first.
        assert_eq!(launch_from(env(&[("RANK", "1"), ("WORLD_SIZE", "2")])), None);
        let both = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
        ]);
        assert_eq!(launch_from(both).map(|l| l.launcher), Some("mpiexec"));
        assert_eq!(launch_from(env(&[])), None);
    }

    #[test]
    fn the_ranks_on_one_machine_share_its_cores() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            threads_per_rank(env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]), 16),
            Some(8)
        );
        assert_eq!(threads_per_rank(env(&[("MPI_LOCALNRANKS", "3")]), 2), Some(1));
        assert_eq!(
            threads_per_rank(
                env(&[("SLURM_CPUS_PER_TASK", "4"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]),
                16
            ),
            Some(4)
        );
        assert_eq!(threads_per_rank(env(&[]), 16), None);
    }

    #[test]
    fn torchruns_ranks_are_refused_with_what_to_do_instead() {
        let l = Launch {
            launcher: "torchrun",
            rank: 0,
            size: 4,
        };
        let why = torchrun_refusal(&l);
        assert!(
            why.contains("rank 0 of 4") && why.contains("NCCL") && why.contains("mpirun -np 4"),
            "{why}"
        );
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn several_ranks_without_mpi_are_refused_with_what_to_do() {
        let err = world_of(Launch {
            launcher: "mpirun",
            rank: 0,
            size: 2,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("rank 0 of 2") && err.contains("--features mpi"), "{err}");
    }
}
