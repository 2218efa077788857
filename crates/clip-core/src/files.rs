//! Files that survive crashes and say when they are damaged: the leaf every module that writes to
//! disk builds on (checkpoints, run folders, caches, indexes).
//!
//! - **Atomic**: [`write_atomic`] writes a temporary file in the same folder, fsyncs it, renames it
//!   into place and fsyncs the folder, so after a crash (even SIGKILL or a power cut) a file is
//!   either the old one or the new one, never half of each.
//! - **Checked**: [`write_checked`] records the size and xxh3-128 hash of each file in its folder's
//!   `manifest.json` ([`Manifest`]); [`read_checked`] verifies them, so a flipped byte is an error
//!   naming the file instead of silently wrong data.
//! - **Cleaned**: [`clean_stale`] removes the temporary files a crashed writer left behind.
//!
//! This module knows files and folders, not what a run is: which folders must hold a manifest is
//! the run folder's rule ([`crate::run_dir`]).

mod manifest;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use manifest::{Manifest, Sum, HASH, MANIFEST, VERSION};

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
    during.hash = HASH.into();
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
    // Only a manifest of ours: another tool's `manifest.json` (an image index's) is left alone.
    match Manifest::read(parent(path)) {
        Ok(Some(_)) => write_checked(parent(path), &[(file_name(path), bytes.to_vec())]),
        _ => write_atomic(path, bytes),
    }
}

/// Reads a file and verifies it against its folder's manifest. A folder without one (written
/// before checksums, or files copied without it) is read unverified, with a warning; a folder
/// that must hold one is the caller's to check first (see [`crate::run_dir::require_manifests`]).
pub fn read_checked(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = parent(path);
    match Manifest::read(dir)? {
        Some(m) => m.verify(path, &bytes)?,
        None => eprintln!(
            "warning: {} is read unverified: {} has no {MANIFEST} (written before checksums, or copied without it)",
            path.display(),
            dir.display()
        ),
    }
    Ok(bytes)
}

/// Removes what a crashed writer left in `dir`: `.NAME.tmp-PID` files whose process is gone.
/// Returns the removed paths. Call it only while holding the folder's lock (see [`crate::run_dir::RunLock`]).
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
        if pid == std::process::id() || !process_alive(pid) {
            std::fs::remove_file(e.path()).with_context(|| format!("removing stale {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// Whether process `pid` is running (on this host): signal 0 checks it exists and may be
/// signalled. A temporary file or a lock named after a process that is gone is stale.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
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

/// The folder holding `path` (`.` for a bare file name).
pub(crate) fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The last part of `path`, as text (`file` when there is none).
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_covered_write_joins_our_manifest_and_leaves_another_tools_alone() {
        let dir = tempfile::tempdir().unwrap();
        // A folder with a checksum manifest: the new file is listed and verifies.
        write_checked(dir.path(), &[("a.txt".into(), b"a".to_vec())]).unwrap();
        write_covered(&dir.path().join("plot.png"), b"png").unwrap();
        let m = Manifest::read(dir.path()).unwrap().unwrap();
        assert!(m.files.contains_key("plot.png") && m.files.contains_key("a.txt"));
        assert_eq!(read_checked(&dir.path().join("plot.png")).unwrap(), b"png");
        // A folder whose manifest.json is another tool's (an index's): written, manifest untouched.
        let other = tempfile::tempdir().unwrap();
        let index = br#"{"version": 2, "fingerprint": "x", "segments": []}"#;
        std::fs::write(other.path().join(MANIFEST), index).unwrap();
        write_covered(&other.path().join("confusion.png"), b"png").unwrap();
        assert_eq!(std::fs::read(other.path().join(MANIFEST)).unwrap(), index);
        assert_eq!(std::fs::read(other.path().join("confusion.png")).unwrap(), b"png");
    }
}
