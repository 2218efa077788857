//! Class folders (`root/<label>/*.jpg`): for people who have labelled images but no captions.
//!
//! The scanner returns one entry per image, as the captions reader returns one row per line;
//! [`super::Dataset`] turns them into pairs, one caption per template (`a photo of a {label}`,
//! `一張{label}的照片` …), keeping each image's label so the same folders can later score
//! zero-shot classification.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::image::is_image_file;

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
    pub path: PathBuf,
}

/// What a scan of `root/<label>/<image>` found.
#[derive(Debug, Clone)]
pub(crate) struct ClassFolders {
    /// Sorted by name, so label indices are stable.
    pub labels: Vec<String>,
    pub images: Vec<FolderImage>,
}

/// Scans `root/<label>/<image>` (one level deep, hidden entries ignored). `None` when `root`
/// has no sub-folder with images in it.
pub(crate) fn scan(root: &Path) -> Result<Option<ClassFolders>> {
    let mut classes = vec![];
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type()?.is_dir() {
            let mut files = vec![];
            for f in std::fs::read_dir(entry.path()).with_context(|| format!("reading {}", entry.path().display()))? {
                let f = f?;
                let file = f.file_name().to_string_lossy().into_owned();
                if !file.starts_with('.') && f.file_type()?.is_file() && is_image_file(Path::new(&file)) {
                    files.push(file);
                }
            }
            if !files.is_empty() {
                files.sort();
                classes.push((name, files));
            }
        }
    }
    if classes.is_empty() {
        return Ok(None);
    }
    classes.sort();
    let mut out = ClassFolders {
        labels: vec![],
        images: vec![],
    };
    for (label, files) in classes {
        let l = out.labels.len();
        for file in files {
            out.images.push(FolderImage {
                label: l,
                name: format!("{label}/{file}"),
                path: root.join(&label).join(&file),
            });
        }
        out.labels.push(label);
    }
    Ok(Some(out))
}
