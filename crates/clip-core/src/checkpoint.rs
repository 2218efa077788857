//! Checkpoint files: every weight, optimiser state and training state that a run writes or reads
//! goes through here.
//!
//! - **Crash-proof**: each file is written to a temporary file in the same folder, fsynced, renamed
//!   into place, and the folder is fsynced, so after a crash (even SIGKILL or a power cut) a file
//!   is either the old one or the new one, never half of each.
//! - **Checked**: each checkpoint folder (the run folder, `last/`) holds a `manifest.json` with the
//!   size and xxh3-128 hash of its files; reading verifies them, so a flipped byte is an error
//!   naming the file instead of silently wrong weights.
//! - **Cleaned**: temporary files a crash left behind are removed when a run is opened for writing
//!   (see [`clean_stale`]).

mod manifest;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

pub use manifest::{Manifest, Sum, MANIFEST};

use crate::optim::{AdamW, OptimMeta};
use crate::params::ParamStore;
pub use crate::run_dir::RunDir;

/// Files of a run folder written by stage 4.
pub const WEIGHTS: &str = "model.safetensors";
pub const CONFIG: &str = "config.toml";
pub const TOKENIZER: &str = "tokenizer.json";
pub const METRICS: &str = "metrics.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The latest checkpoint (for `--resume`), beside the best model.
pub const LAST: &str = "last";
pub const STATE: &str = "state.json";
/// Which data a run trains on (see [`crate::run_dir::DataIdentity`]). Its presence also marks a
/// run written with every file checksummed: such a run's folders must hold a manifest.
pub const DATASET: &str = "dataset.json";

/// Writes `bytes` to `path` atomically (temporary file + fsync + rename + fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let tmp = temp_path(path);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// Writes a group of files into `dir` and records their checksums in its manifest.
///
/// Every file is first written and fsynced under a temporary name; the manifest then accepts both
/// the old and the new version of each while they are renamed into place, and finally only the new
/// one. A crash at any point leaves each file complete and verifiable.
pub fn write_checked(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    // An unreadable old manifest only loses the old versions' sums: the new files replace them.
    // A folder keeps its manifest's version: an old run's stays 1 (it never listed every file).
    let old = Manifest::read(dir).ok().flatten().unwrap_or_default();
    let mut during = old.clone();
    during.hash = manifest::HASH.into();
    let mut done = during.clone();
    let mut renames = vec![];
    for (name, bytes) in files {
        let path = dir.join(name);
        let tmp = temp_path(&path);
        write_synced(&tmp, bytes)?;
        let sum = Sum::of(bytes);
        let mut accepted = vec![sum];
        accepted.extend(old.files.get(name).into_iter().flatten().copied().filter(|s| *s != sum));
        during.files.insert(name.clone(), accepted);
        done.files.insert(name.clone(), vec![sum]);
        renames.push((tmp, path));
    }
    write_atomic(&dir.join(MANIFEST), &during.to_json()?)?;
    for (tmp, path) in renames {
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    }
    sync_dir(dir)?;
    write_atomic(&dir.join(MANIFEST), &done.to_json()?)
}

/// Writes one file into a folder: through [`write_checked`] when the folder holds a checksum
/// manifest (a run folder: every file it holds stays covered), else with [`write_atomic`].
pub fn write_covered(path: &Path, bytes: &[u8]) -> Result<()> {
    if parent(path).join(MANIFEST).is_file() {
        write_checked(parent(path), &[(file_name(path), bytes.to_vec())])
    } else {
        write_atomic(path, bytes)
    }
}

/// Reads a file and verifies it against its folder's manifest. Without a manifest, a folder of a
/// run that checksums every file (see [`DATASET`]) is an error; any other folder (a run written
/// before checksums, model files copied elsewhere) is read unverified, with a warning.
pub fn read_checked(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = parent(path);
    match Manifest::read(dir)? {
        Some(m) => m.verify(path, &bytes)?,
        None if requires_manifest(dir) => anyhow::bail!(
            "{} has no {MANIFEST}, so {} cannot be verified: the manifest was deleted or lost — restore it from a copy, or resume from the run's last/ checkpoint",
            dir.display(),
            path.display()
        ),
        None => eprintln!(
            "warning: {} is read unverified: {} has no {MANIFEST} (written before checksums, or copied without it)",
            path.display(),
            dir.display()
        ),
    }
    Ok(bytes)
}

/// Whether `dir` belongs to a run that checksums every file: the run folder holds [`DATASET`]
/// (for `last/`, its parent does).
fn requires_manifest(dir: &Path) -> bool {
    let run = if dir.file_name().is_some_and(|n| n == LAST) {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    run.join(DATASET).is_file()
}

/// Serialises tensors to safetensors bytes in memory (so they can be written atomically).
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    Ok(safetensors::serialize(sorted, None)?)
}

/// The tensors of a safetensors file, on the CPU, after verifying its checksum.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = read_checked(path)?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))
}

/// Every parameter and buffer of a model as safetensors bytes.
pub fn weights_bytes(params: &ParamStore) -> Result<Vec<u8>> {
    let mut tensors = HashMap::new();
    for (name, t) in params.tensors() {
        tensors.insert(name, t.to_device(&Device::Cpu)?);
    }
    safetensors_bytes(&tensors)
}

/// Saves every parameter and buffer to `path`, checksummed in its folder's manifest.
pub fn save_weights(params: &ParamStore, path: &Path) -> Result<()> {
    write_checked(parent(path), &[(file_name(path), weights_bytes(params)?)])
}

/// Loads every parameter and buffer from a (verified) safetensors file.
pub fn load_weights(params: &ParamStore, path: &Path) -> Result<()> {
    let loaded = read_tensors(path).with_context(|| format!("reading weights from {}", path.display()))?;
    params
        .load_map(&loaded)
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// The optimiser's two files: the moments as safetensors at `path`, the rest as JSON beside it.
pub fn optimizer_files(opt: &AdamW, path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let meta_path = path.with_extension("json");
    Ok(vec![
        (file_name(path), safetensors_bytes(&opt.state_tensors()?)?),
        (file_name(&meta_path), serde_json::to_vec_pretty(&opt.meta())?),
    ])
}

/// Saves the optimiser's state to `path` (and `path` with `.json`), checksummed.
pub fn save_optimizer(opt: &AdamW, path: &Path) -> Result<()> {
    write_checked(parent(path), &optimizer_files(opt, path)?)
}

/// Loads an optimiser state written by [`save_optimizer`], verifying both files.
pub fn load_optimizer(opt: &mut AdamW, path: &Path) -> Result<()> {
    let tensors = read_tensors(path).with_context(|| format!("reading optimiser state {}", path.display()))?;
    let meta_path = path.with_extension("json");
    let meta: OptimMeta = serde_json::from_slice(&read_checked(&meta_path)?)
        .with_context(|| format!("parsing {}", meta_path.display()))?;
    opt.restore(&tensors, meta)
        .with_context(|| format!("optimiser state {}", path.display()))
}

/// Removes what a crashed writer left in `dir`: `.NAME.tmp-PID` files whose process is gone.
/// Returns the removed paths. Call it only while holding the folder's [`crate::run_dir::RunLock`].
pub fn clean_stale(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !crate::run_dir::process_alive(pid) {
            std::fs::remove_file(e.path()).with_context(|| format!("removing stale {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// Flushes a folder's entries (the renames into it) to disk. Filesystems that cannot sync a
/// folder are skipped.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = std::fs::File::open(dir).with_context(|| format!("opening folder {}", dir.display()))?;
        if let Err(e) = f.sync_all() {
            if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) {
                return Err(e).with_context(|| format!("syncing folder {}", dir.display()));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))
}

/// `.NAME.tmp-PID` beside `path` (found again by [`clean_stale`]).
fn temp_path(path: &Path) -> PathBuf {
    parent(path).join(format!(".{}.tmp-{}", file_name(path), std::process::id()))
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into())
}
