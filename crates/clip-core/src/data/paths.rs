//! Where a dataset's files are, and the rule that they stay inside it.
//!
//! Every path a dataset names is resolved here: relative to the dataset folder, never through
//! `..` or from the root, and — once symlinks are resolved — still inside the folder, so a
//! captions file or a link cannot make training read (or a server show) files from elsewhere.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

/// The canonical path when the file exists (no `..` in messages), else the plain absolute one.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    match path.canonicalize() {
        Ok(p) => Ok(p),
        Err(_) => std::path::absolute(path).with_context(|| format!("resolving {}", path.display())),
    }
}

/// An image name from a captions file as a path relative to the dataset folder, refusing
/// anything that could leave it (`..`, an absolute path) or that names no file.
pub fn relative_image_path(name: &str) -> std::result::Result<PathBuf, String> {
    let path = Path::new(name);
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "image path {name} escapes the dataset folder: write it relative to the folder, without `..`"
                ));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(format!("image path {name:?} names no file"));
    }
    Ok(rel)
}

/// `path` with every symlink resolved, when that is still inside `root` (itself canonical).
/// A link that points outside is an error saying where it points.
pub fn contained(root: &Path, path: &Path) -> std::result::Result<PathBuf, String> {
    let real = path
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(format!(
            "{} leads outside the dataset folder (to {}): symlinks must stay inside {}",
            path.display(),
            real.display(),
            root.display()
        ))
    }
}

/// The `images` sub-folder of `dir`, in any case (Flickr8k's is `Images/`).
pub fn images_dir(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join("images");
    if exact.is_dir() {
        return Some(exact);
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_str().is_some_and(|n| n.eq_ignore_ascii_case("images")) && e.path().is_dir())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(relative_image_path("a/./b.jpg").unwrap(), PathBuf::from("a/b.jpg"));
        assert!(relative_image_path("../x.jpg").is_err());
        assert!(relative_image_path("/etc/passwd").is_err());
        assert!(relative_image_path(".").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.jpg"), b"x").unwrap();
        std::fs::write(root.path().join("ok.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.jpg"), root.path().join("link.jpg")).unwrap();
        std::os::unix::fs::symlink(root.path().join("ok.jpg"), root.path().join("inner.jpg")).unwrap();
        let r = root.path().canonicalize().unwrap();
        assert!(contained(&r, &r.join("ok.jpg")).is_ok());
        assert!(contained(&r, &r.join("inner.jpg")).is_ok());
        let err = contained(&r, &r.join("link.jpg")).unwrap_err();
        assert!(err.contains("outside the dataset folder"), "{err}");
    }
}
