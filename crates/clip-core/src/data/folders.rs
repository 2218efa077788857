//! Class folders (`root/<label>/*.jpg`): for people who have labelled images but no captions.
//!
//! The scanner returns one entry per image, as the captions reader returns one row per line;
//! [`super::Dataset`] turns them into pairs, one caption per template (`a photo of a {label}`,
//! `一張{label}的照片` …), keeping each image's label so the same folders can later score
//! zero-shot classification.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::image::is_image_file;
use super::paths::contained;
use super::types::BadRow;

/// A template with `{label}` replaced by the label.
pub fn render_template(template: &str, label: &str) -> String {
    template.replace("{label}", label)
}

/// One image of a class folder.
#[derive(Debug, Clone)]
pub(crate) struct FolderImage {
    /// Index into [`ClassFolders::labels`].
    pub label: usize,
    /// `label/file.jpg`.
    pub name: String,
    /// Symlinks resolved (and inside the root).
    pub path: PathBuf,
}

/// What a scan of `root/<label>/<image>` found.
#[derive(Debug, Clone)]
pub(crate) struct ClassFolders {
    /// Sorted by name, so label indices are stable.
    pub labels: Vec<String>,
    pub images: Vec<FolderImage>,
    /// Symlinked class folders and images that lead outside the root (or nowhere).
    pub bad: Vec<BadRow>,
}

/// Where an entry of a class folder scan really is: itself, or the target of a symlink that stays
/// inside `root`. A link out of `root` (or a broken one) is a [`BadRow`] when `wanted` says it
/// would have been used, and is ignored otherwise.
///
/// `listed` is where the entry is listed: under the class folder's own name, not its target.
fn resolve(
    root: &Path,
    listed: &Path,
    entry: &std::fs::DirEntry,
    wanted: impl Fn(&Path) -> bool,
    bad: &mut Vec<BadRow>,
) -> Result<Option<PathBuf>> {
    let path = entry.path();
    let kind = entry
        .file_type()
        .with_context(|| format!("reading {}", path.display()))?;
    if !kind.is_symlink() {
        return Ok(Some(path));
    }
    match contained(root, &path) {
        Ok(real) => Ok(Some(real)),
        Err(reason) => {
            if wanted(&path) {
                // The row names the link already: the reason need not repeat it.
                let prefix = format!("{} ", path.display());
                bad.push(BadRow::new(listed, 0, reason.strip_prefix(&prefix).unwrap_or(&reason)));
            }
            Ok(None)
        }
    }
}

/// Scans `root/<label>/<image>` (one level deep, hidden entries ignored). Symlinked folders and
/// images are followed while they stay inside `root` (itself canonical); links out of it are
/// listed in [`ClassFolders::bad`]. `None` when `root` has no sub-folder with images in it and no
/// such link.
pub(crate) fn scan(root: &Path) -> Result<Option<ClassFolders>> {
    let mut classes = vec![];
    let mut bad = vec![];
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Some(dir) = resolve(root, &entry.path(), &entry, |p| p.is_dir() || !p.exists(), &mut bad)? else {
            continue;
        };
        if !dir.is_dir() {
            continue;
        }
        let mut files = vec![];
        for f in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let f = f?;
            let file = f.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') || !is_image_file(Path::new(&file)) {
                continue;
            }
            if let Some(real) = resolve(root, &root.join(&name).join(&file), &f, |_| true, &mut bad)? {
                if real.is_file() {
                    files.push((file, real));
                }
            }
        }
        if !files.is_empty() {
            files.sort();
            classes.push((name, files));
        }
    }
    if classes.is_empty() && bad.is_empty() {
        return Ok(None);
    }
    classes.sort();
    bad.sort_by(|a, b| a.file.cmp(&b.file));
    let mut out = ClassFolders {
        labels: vec![],
        images: vec![],
        bad,
    };
    for (label, files) in classes {
        let l = out.labels.len();
        for (file, path) in files {
            out.images.push(FolderImage {
                label: l,
                name: format!("{label}/{file}"),
                path,
            });
        }
        out.labels.push(label);
    }
    Ok(Some(out))
}
