//! Where an export goes: the destination checked (not inside the model's own folders; empty or
//! an earlier export), and the folder written beside it renamed into place.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::files::{sync_dir, write_atomic};

/// Every name an export writes, in either format: a folder holding these alone is an export.
const EXPORT_FILES: &[&str] = &[
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "image_encoder.onnx",
    "text_encoder.onnx",
    "image_encoder.onnx.data",
    "text_encoder.onnx.data",
    "clip.json",
];

/// What the folder an export is asked to write holds now.
pub(super) enum Existing {
    Nothing,
    Empty,
    /// Files an export writes, and nothing else.
    Export(Vec<String>),
    /// Anything else: what an export would never write.
    Other(Vec<String>),
}

pub(super) fn existing(out: &Path) -> Result<Existing> {
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    if !meta.is_dir() {
        bail!(
            "{} is not a folder: an export writes a folder; choose another name",
            out.display()
        );
    }
    let mut names = vec![];
    let mut others = vec![];
    for e in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let e = e.with_context(|| format!("reading {}", out.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if file && EXPORT_FILES.contains(&name.as_str()) {
            names.push(name);
        } else {
            others.push(if file { name } else { format!("{name}/") });
        }
    }
    names.sort();
    others.sort();
    Ok(if !others.is_empty() {
        Existing::Other(others)
    } else if names.is_empty() {
        Existing::Empty
    } else {
        Existing::Export(names)
    })
}

/// `path` with its nearest existing ancestor resolved (links, `..`) and the rest joined lexically:
/// where the folder would be once created.
pub(super) fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut rest = vec![];
    let mut base = abs.as_path();
    let canonical = loop {
        if let Ok(c) = base.canonicalize() {
            break c;
        }
        match (base.parent(), base.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                base = p;
            }
            // `..` or the root: resolve what is left lexically.
            _ => match base.parent() {
                Some(p) => {
                    rest.push("..".into());
                    base = p;
                }
                None => break base.to_path_buf(),
            },
        }
    };
    let mut out = canonical;
    for c in rest.iter().rev() {
        if c == ".." {
            out.pop();
        } else if c != "." {
            out.push(c);
        }
    }
    Ok(out)
}

/// Refuses an `out` that is one of `sources` — the folders the model is read from (a run folder,
/// a checkpoint's folder) — or lies inside one: replacing it would destroy the model exported,
/// and an export beside a run's files would be mistaken for them.
pub fn check_out(out: &Path, sources: &[(&str, &Path)]) -> Result<()> {
    let at = resolved(out)?;
    for (what, src) in sources {
        let Ok(src_at) = src.canonicalize() else {
            continue;
        };
        if at.starts_with(&src_at) {
            bail!(
                "{} {} {what} {}: an export there would replace or mix with the model's own files; choose a folder outside it",
                out.display(),
                if at == src_at { "is" } else { "lies inside" },
                src.display()
            );
        }
    }
    Ok(())
}

/// Writes `files` (name, bytes) into a temporary folder beside `out` (at `at`, in `parent`, named
/// `base`) and renames it into place, replacing what `before` found there. Any error leaves
/// nothing beside `out`.
pub(super) fn write(
    files: &[(String, Vec<u8>)],
    out: &Path,
    at: &Path,
    parent: &Path,
    base: &str,
    before: &Existing,
) -> Result<()> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating folder {}", parent.display()))?;
    let prefix = format!(".{base}-export-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The umask applies, as to any folder made: not tempfile's private 0700.
        builder.permissions(std::fs::Permissions::from_mode(0o777));
    }
    // Removed on any error below: a failed export leaves nothing beside `out`.
    let tmp = builder
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    for (name, bytes) in files {
        write_atomic(&tmp.path().join(name), bytes).with_context(|| format!("exporting to {}", out.display()))?;
    }
    install(tmp, at, parent, base, before)
}

/// Renames the written folder `tmp` to `out`, replacing what `before` found there.
fn install(tmp: tempfile::TempDir, out: &Path, parent: &Path, base: &str, before: &Existing) -> Result<()> {
    let renamed = |from: &Path, to: &Path| {
        std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    };
    match before {
        Existing::Nothing => renamed(tmp.path(), out)?,
        Existing::Empty => {
            std::fs::remove_dir(out).with_context(|| format!("replacing the empty folder {}", out.display()))?;
            renamed(tmp.path(), out)?;
        }
        Existing::Export(_) if exchange(tmp.path(), out)? => {
            // One atomic swap: `out` is the new export, `tmp` holds the old one (dropping `tmp`
            // removes it). There is no moment without an `out`.
            sync_dir(parent)?;
            return tmp.close().with_context(|| {
                format!(
                    "the new export is in {}, but the one it replaced could not be removed",
                    out.display()
                )
            });
        }
        Existing::Export(_) => {
            // Where the file system cannot swap two names at once: the old export steps aside
            // under a name of its own, the new one takes its place, and only then is the old one
            // removed (a crash between the two renames leaves the old one beside, named).
            let old = tempfile::Builder::new()
                .prefix(&format!(".{base}-replaced-"))
                .tempdir_in(parent)
                .with_context(|| format!("creating a temporary folder in {}", parent.display()))?
                .keep();
            std::fs::remove_dir(&old).with_context(|| format!("removing {}", old.display()))?;
            renamed(out, &old)?;
            if let Err(e) = renamed(tmp.path(), out) {
                let _ = std::fs::rename(&old, out);
                return Err(e);
            }
            std::fs::remove_dir_all(&old).with_context(|| {
                format!(
                    "the new export is in {}, but the one it replaced could not be removed from {}",
                    out.display(),
                    old.display()
                )
            })?;
        }
        Existing::Other(_) => bail!("internal error: {} holds other files", out.display()),
    }
    // The folder is `out` now: nothing left to clean up.
    let _ = tmp.keep();
    sync_dir(parent)
}

/// Swaps the names `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`): `Ok(false)`
/// where the system or file system cannot, and the caller falls back to two renames.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 only reads them.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e).with_context(|| format!("swapping {} and {}", a.display(), b.display())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}
