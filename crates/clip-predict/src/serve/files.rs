//! What is served from disk: the indexed folder (refused at start when too broad), and an indexed
//! image only, checked to be the very file indexed and an image by its bytes.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{error, mib, Reply, State, IMAGE_BUDGET_MIB, MAX_IMAGE_BYTES};

/// Refuses to serve a canonical indexed folder that would publish far more than photos (see
/// [`too_broad`]), unless the user named that same folder (`--images`). A named folder must be
/// the index's.
pub(super) fn check_root(root: &Path, named: Option<&Path>, index: &Path) -> Result<()> {
    if let Some(dir) = named {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--images {}: no such folder", dir.display()))?;
        if dir != root {
            bail!(
                "--images {} is not the folder the index {} was made from ({})",
                dir.display(),
                index.display(),
                root.display()
            );
        }
        return Ok(());
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .and_then(|h| PathBuf::from(h).canonicalize().ok());
    if let Some(why) = too_broad(root, home.as_deref()) {
        bail!(
            "the index {} is of {} ({why}): serving it could publish any file there. If you mean it, name the folder: --images {}",
            index.display(),
            root.display(),
            root.display()
        );
    }
    Ok(())
}

/// Why a canonical folder is too broad to serve without being named: the file system's root,
/// the home folder or one above it, a system folder (or inside one of /etc, /proc, /sys, /dev,
/// /boot).
fn too_broad(root: &Path, home: Option<&Path>) -> Option<&'static str> {
    if root.parent().is_none() {
        return Some("the root of the file system");
    }
    if let Some(home) = home {
        if home == root {
            return Some("your home folder");
        }
        if home.starts_with(root) {
            return Some("a folder holding your home folder");
        }
    }
    let canon = |p: &str| Path::new(p).canonicalize().unwrap_or_else(|_| PathBuf::from(p));
    const INSIDE: [&str; 5] = ["/etc", "/proc", "/sys", "/dev", "/boot"];
    if INSIDE.iter().any(|p| root.starts_with(canon(p))) {
        return Some("a system folder");
    }
    const EXACT: [&str; 17] = [
        "/root", "/home", "/Users", "/usr", "/var", "/opt", "/srv", "/tmp", "/mnt", "/media", "/run", "/bin", "/sbin",
        "/lib", "/lib64", "/System", "/Library",
    ];
    if EXACT.iter().any(|p| root == canon(p)) {
        return Some("a system folder");
    }
    None
}

/// An indexed image. The URL path is decoded, then must be exactly an indexed relative path (so
/// `..`, absolute paths and unindexed files never reach the file system), must resolve inside
/// the indexed folder (so a link in it cannot lead elsewhere), must be a regular file and must
/// be an image by its first bytes (its content type is the format found there, not its name's).
/// Its size is taken from the image budget (held in `held` until it is sent); 503 when spent.
pub(super) fn serve_image(
    state: &State,
    raw: &str,
    budget: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Reply {
    let Ok(rel) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return error(400, "the path is not UTF-8");
    };
    let rel = rel.into_owned();
    let p = Path::new(&rel);
    if rel.contains('\\') || rel.contains('\0') || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return error(403, "only indexed images are served");
    }
    let Some(&i) = state.by_path.get(&rel) else {
        return error(404, "not an indexed image");
    };
    let real = match state.root.join(p).canonicalize() {
        Ok(real) if real.starts_with(&state.root) => real,
        Ok(_) => return error(403, "the indexed path leads outside the indexed folder"),
        Err(_) => return error(404, "the indexed image is gone"),
    };
    // Only the very file that was indexed: its size, modification time (to the nanosecond) and
    // inode as the index recorded them. A manifest written by someone else cannot know those of
    // this machine's files, so an index pointed at another folder serves nothing from it.
    match clip_core::index::stat_entry(&real, &rel) {
        Ok(now) if state.index.entries[i].unchanged(&now) => {}
        Ok(_) => {
            return error(
                404,
                "this file is not the one the index holds (changed since it was indexed, or the index was not made of this folder): run `clip-predict index` again",
            )
        }
        Err(_) => return error(404, "the indexed image is gone"),
    }
    // Not a device, a FIFO or a folder: those are never opened.
    let len = match std::fs::metadata(&real) {
        Ok(m) if m.is_file() && m.len() <= MAX_IMAGE_BYTES => m.len(),
        Ok(m) if m.is_file() => return error(403, "the indexed file is too large to serve"),
        Ok(_) => return error(403, "the indexed path is not an image file"),
        Err(_) => return error(404, "the indexed image is gone"),
    };
    match budget.clone().try_acquire_many_owned(mib(len)) {
        Ok(permit) => *held = Some(permit),
        Err(_) => {
            return error(
                503,
                format!("the server is sending {IMAGE_BUDGET_MIB} MiB of images already: try again shortly"),
            )
        }
    }
    let read = || -> std::io::Result<Option<(&'static str, Vec<u8>)>> {
        // No more than was measured (and taken from the budget), should the file grow.
        let mut file = std::fs::File::open(&real)?.take(len);
        let mut bytes = Vec::with_capacity(len as usize);
        (&mut file).take(64).read_to_end(&mut bytes)?;
        let Some(ctype) = image_type(&bytes) else {
            return Ok(None);
        };
        file.read_to_end(&mut bytes)?;
        Ok(Some((ctype, bytes)))
    };
    match read() {
        Ok(Some((ctype, bytes))) => (200, ctype, bytes),
        Ok(None) => error(403, "the indexed file is not an image"),
        Err(_) => error(404, "the indexed image cannot be read"),
    }
}

/// The content type of an image a browser shows, from the file's first bytes; `None` for
/// anything else.
fn image_type(head: &[u8]) -> Option<&'static str> {
    use image::ImageFormat as F;
    match image::guess_format(head).ok()? {
        f @ (F::Jpeg | F::Png | F::WebP | F::Gif | F::Bmp) => Some(f.to_mime_type()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broad_folders_are_refused_unless_named() {
        let home = Path::new("/home/ann");
        for (p, broad) in [
            ("/", true),
            ("/home", true),
            ("/home/ann", true),
            ("/etc", true),
            ("/etc/ssl", true),
            ("/proc/self", true),
            ("/usr", true),
            ("/home/ann/photos", false),
            ("/usr/share/backgrounds", false),
        ] {
            assert_eq!(too_broad(Path::new(p), Some(home)).is_some(), broad, "{p}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let other = tempfile::tempdir().unwrap();
        assert!(check_root(&root, None, Path::new("idx")).is_ok());
        assert!(check_root(&root, Some(tmp.path()), Path::new("idx")).is_ok());
        let err = check_root(&root, Some(other.path()), Path::new("idx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not the folder the index"), "{err}");
        let err = check_root(Path::new("/"), None, Path::new("idx"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--images /") && err.contains("root of the file system"),
            "{err}"
        );
        assert!(check_root(Path::new("/"), Some(Path::new("/")), Path::new("idx")).is_ok());
    }

    #[test]
    fn served_files_are_images_by_their_bytes() {
        assert_eq!(image_type(b"\xff\xd8\xff\xe0\0\x10JFIF"), Some("image/jpeg"));
        assert_eq!(image_type(b"\x89PNG\r\n\x1a\n\0\0"), Some("image/png"));
        assert_eq!(image_type(b"root:x:0:0:root:/root:/bin/bash\n"), None);
        assert_eq!(image_type(b""), None);
    }
}
