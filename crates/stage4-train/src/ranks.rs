//! Stage 4 as one rank of several: `mpirun -np N stage4-train …` or `srun` (a build with
//! feature `mpi`). Every rank opens the same run and trains its share of every batch
//! ([`clip_core::fit::Trainer::set_world`]); rank 0 alone prints, writes the run folder and judges
//! the result. The others write nothing there: a new run's other ranks start in a scratch folder
//! of their own, a resumed run's copy rank 0's checkpoint into one (the run folder must be on a
//! file system every rank sees, as clusters' shared home and scratch folders are), and the
//! scratch folders are removed when the ranks end. A rank that fails prints its error with its
//! rank and ends every rank of the job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clip_cli::Report;
use clip_core::dist::{Collective, Metered};
use clip_mpi::Launch;

/// This process's place among the ranks of the run.
pub struct Ranks {
    pub world: Arc<dyn Collective>,
    /// The same world, counting its traffic.
    metered: Arc<Metered>,
    /// The launcher that started the ranks, when several train.
    pub launch: Option<Launch>,
    /// A follower's private run folder, removed when the process ends.
    scratch: Option<tempfile::TempDir>,
}

impl Ranks {
    /// Joins the world the launcher started (one process alone without one). A follower's
    /// standard output goes to /dev/null from here on: rank 0 speaks for the run.
    pub fn join() -> Result<Self> {
        clip_mpi::share_cores();
        let metered = Arc::new(Metered::new(clip_mpi::connect()?.into()));
        let world: Arc<dyn Collective> = metered.clone();
        let launch = clip_mpi::launch().filter(|_| world.size() > 1);
        if world.rank() > 0 {
            silence_stdout()?;
        }
        Ok(Self {
            world,
            metered,
            launch,
            scratch: None,
        })
    }

    /// Whether this process prints and writes for the run (rank 0, or the only process).
    pub fn leads(&self) -> bool {
        self.world.rank() == 0
    }

    pub fn size(&self) -> usize {
        self.world.size()
    }

    /// Ends the job after `e` on this rank: one process returns it (stage 4 prints it and
    /// exits); a rank prints it with its rank and aborts every rank, which would otherwise wait
    /// for it in their next step.
    pub fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        if self.size() > 1 {
            eprintln!("rank {} of {}: error: {e:#}", self.world.rank(), self.size());
            self.world.abort(2);
        }
        e
    }

    /// The folder a follower trains in: an empty scratch folder for a new run, or one holding a
    /// copy of the run `leader` resumes (everything but its lock, feature cache and pictures).
    pub fn scratch(&mut self, leader: &Path, resume: bool) -> Result<PathBuf> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("clipmine-rank{}-", self.world.rank()))
            .tempdir()
            .context("creating this rank's scratch folder")?;
        let run = dir.path().join("run");
        if resume {
            copy_run(leader, &run).with_context(|| format!("copying the run {} to resume it", leader.display()))?;
        }
        self.scratch = Some(dir);
        Ok(run)
    }

    /// The command that starts the same ranks again: `mpirun -np N` or `srun -n N`.
    pub fn launcher_prefix(&self) -> Option<String> {
        self.launch.as_ref().map(|l| match l.launcher {
            "srun" => format!("srun -n {}", l.size),
            other => format!("{other} -np {}", l.size),
        })
    }
}

impl Ranks {
    /// What the collectives cost this rank over `steps` steps that took `seconds` in all
    /// (printed, and recorded in the report): bytes and time per step. Nothing for one process.
    pub fn describe_traffic(&self, steps: u64, seconds: f64, report: &mut Report) {
        if self.size() < 2 || steps == 0 {
            return;
        }
        let t = self.metered.traffic();
        let (mb, ms) = (t.bytes as f64 / steps as f64 / 1e6, t.seconds / steps as f64 * 1e3);
        println!(
            "collectives on rank 0: {mb:.2} MB and {ms:.1} ms per step ({:.0} % of training time, waiting for the slowest rank included; {} calls)",
            100.0 * t.seconds / seconds.max(1e-9),
            t.calls
        );
        report.metric("collective_mb_per_step", mb);
        report.metric("collective_ms_per_step", ms);
    }
}

/// Refuses what several ranks cannot do: a run folder chosen per process (each would pick its own).
pub fn check_args(ranks: &Ranks, out: Option<&Path>, resume: Option<&Path>) -> Result<()> {
    if ranks.size() > 1 && out.is_none() && resume.is_none() {
        bail!(
            "{} ranks train one run: name its folder with --out (each rank would otherwise choose its own)",
            ranks.size()
        );
    }
    Ok(())
}

/// Copies the files of run folder `from` into `to` (created), but its lock, its feature cache
/// (a follower computes its own) and its pictures and report.
fn copy_run(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let skipped = name_str == clip_core::run_dir::LOCK
            || name_str == clip_core::feature_cache::CACHE_DIR
            || name_str.ends_with(".png")
            || name_str.ends_with(".html");
        if skipped {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_run(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Points standard output at /dev/null.
fn silence_stdout() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    // SAFETY: dup2 on two open descriptors; standard output is replaced atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        bail!("silencing this rank's output: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
