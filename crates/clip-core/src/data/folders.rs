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

/// The prompt ensemble zero-shot classification uses with English labels: CLIP's own kind of
/// templates (its ImageNet prompt-engineering notebook), whose averaged text embeddings classify
/// better than any one of them.
pub const ENSEMBLE_EN: [&str; 8] = [
    "a photo of a {label}.",
    "a photo of the {label}.",
    "itap of a {label}.",
    "a bad photo of the {label}.",
    "a photo of the large {label}.",
    "a photo of the small {label}.",
    "a close-up photo of a {label}.",
    "art of the {label}.",
];

/// The ensemble for Chinese labels, after Chinese-CLIP's zero-shot templates.
pub const ENSEMBLE_ZH: [&str; 7] = [
    "{label}的照片。",
    "一张{label}的照片。",
    "一张好看的{label}的照片。",
    "一张清晰的{label}的照片。",
    "{label}的特写照片。",
    "质量差的{label}的照片。",
    "{label}的低分辨率照片。",
];

/// The built-in ensemble for `labels`: Chinese when any label holds a CJK character, else English.
pub fn default_ensemble(labels: &[String]) -> Vec<String> {
    let cjk = |c: char| matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F);
    let set: &[&str] = if labels.iter().any(|l| l.chars().any(cjk)) {
        &ENSEMBLE_ZH
    } else {
        &ENSEMBLE_EN
    };
    set.iter().map(|t| t.to_string()).collect()
}

/// Templates from a file, one per line (blank lines and `#` comments skipped); each must hold
/// `{label}`, or the error names the file and line.
pub fn read_templates(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading templates {}", path.display()))?;
    let mut out = vec![];
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !t.contains("{label}") {
            anyhow::bail!("{}:{}: template {t:?} has no {{label}}", path.display(), n + 1);
        }
        out.push(t.to_string());
    }
    if out.is_empty() {
        anyhow::bail!(
            "{} holds no templates (one per line, each with {{label}})",
            path.display()
        );
    }
    Ok(out)
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

/// Images directly in `dir` (hidden entries ignored, symlinks followed while they stay inside
/// `root`), sorted by name: a folder of photos without captions, which can only distil an image
/// tower from a teacher. Names are relative to `root`.
pub(crate) fn scan_flat(root: &Path, dir: &Path) -> Result<(Vec<FolderImage>, Vec<BadRow>)> {
    let mut bad = vec![];
    let mut files = vec![];
    for f in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let f = f?;
        let file = f.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') || !is_image_file(Path::new(&file)) {
            continue;
        }
        if let Some(real) = resolve(root, &dir.join(&file), &f, |_| true, &mut bad)? {
            if real.is_file() {
                let name = dir
                    .join(&file)
                    .strip_prefix(root)
                    .map_or(file.clone(), |p| p.to_string_lossy().into_owned());
                files.push((name, real));
            }
        }
    }
    files.sort();
    let images = files
        .into_iter()
        .map(|(name, path)| FolderImage { label: 0, name, path })
        .collect();
    Ok((images, bad))
}
