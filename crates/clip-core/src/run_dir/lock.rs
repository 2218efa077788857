//! One writer per run folder: `run.lock`, held with an OS file lock while a run writes the folder.
//!
//! The kernel releases the lock when its process ends, however it ends, so a lock left by a killed
//! run (SIGKILL, a crash, a power cut) is recognised — the file names a process but nobody holds it
//! — and taken over. The file's text (PID, host, start time) is there to name the holder in the
//! message a second run gets; a clean exit empties it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The lock's file name in a run folder.
pub const LOCK: &str = "run.lock";

/// The lock of a run folder, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    /// The run folder.
    pub dir: PathBuf,
    /// The holder whose lock was taken over (it ended without releasing it), if any.
    pub took_over: Option<Holder>,
}

/// Who holds (or held) a lock, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = now().saturating_sub(self.started);
        write!(f, "process {} on host {} (started {ago} s ago)", self.pid, self.host)
    }
}

impl Holder {
    fn me() -> Self {
        Self {
            pid: std::process::id(),
            host: hostname(),
            started: now(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(str::trim)
        };
        Some(Self {
            pid: field("pid")?.parse().ok()?,
            host: field("host").unwrap_or("?").to_string(),
            started: field("started").and_then(|s| s.parse().ok()).unwrap_or(0),
        })
    }

    fn to_text(&self) -> String {
        format!("pid={}\nhost={}\nstarted={}\n", self.pid, self.host, self.started)
    }
}

impl RunLock {
    /// Locks `dir` (created if missing) for this process, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating run folder {}", dir.display()))?;
        let path = dir.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !try_lock(&file, &path)? {
            let holder = Holder::parse(&read_all(&mut file).unwrap_or_default())
                .map(|h| h.to_string())
                .unwrap_or_else(|| "another process".into());
            bail!(
                "run folder {} is in use by {holder}: only one run may write a folder — wait for it to finish, stop it (Ctrl-C saves a checkpoint to resume from), or choose another --out",
                dir.display()
            );
        }
        let took_over = Holder::parse(&read_all(&mut file)?);
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(Holder::me().to_text().as_bytes())?;
        file.sync_all()?;
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
            took_over,
        })
    }
}

impl Drop for RunLock {
    /// Empties the file (a clean exit leaves no holder named); the OS lock goes with the handle.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

fn read_all(file: &mut File) -> Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut s = String::new();
    file.read_to_string(&mut s)?;
    Ok(s)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Takes the OS lock without waiting; false when another open handle holds it.
#[cfg(unix)]
fn try_lock(file: &File, path: &Path) -> Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e).with_context(|| format!("locking {} (does this filesystem support file locks?)", path.display()))
}

/// Without flock: a non-empty lock file counts as held (remove it by hand after a crash).
#[cfg(not(unix))]
fn try_lock(file: &File, _path: &Path) -> Result<bool> {
    Ok(file.metadata()?.len() == 0)
}

fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer outlives the call and its length is passed.
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
    }
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::process_alive;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        assert!(first.took_over.is_none());
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("in use by process {}", std::process::id())) && err.contains("on host"),
            "{err}"
        );
        drop(first);
        let again = RunLock::acquire(dir.path()).unwrap();
        assert!(again.took_over.is_none(), "a released lock names nobody");
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has ended: its id is in the file, but nobody holds the OS lock.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
        std::fs::write(dir.path().join(LOCK), format!("pid={pid}\nhost=h\nstarted=1\n")).unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over.as_ref().map(|h| h.pid), Some(pid));
        let text = std::fs::read_to_string(dir.path().join(LOCK)).unwrap();
        assert!(text.contains(&format!("pid={}", std::process::id())), "{text}");
    }
}
