//! Class folders (`root/<label>/*.jpg`): for people who have labelled images but no captions.
//!
//! Each image gets one caption per template (`a photo of a {label}`, `一張{label}的照片` …), and
//! keeps its label, so the same folders can later score zero-shot classification.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::dataset::{absolute, Dataset, ImageEntry, Pair, Source};
use super::image::is_image_file;

/// A template with `{label}` replaced by the label.
pub fn render_template(template: &str, label: &str) -> String {
    template.replace("{label}", label)
}

/// Reads `root/<label>/<image>` (one level deep, hidden entries ignored). `None` when `root` has
/// no sub-folder with images in it. Labels are sorted by name so indices are stable.
pub(crate) fn load(root: &Path, templates: &[String]) -> Result<Option<Dataset>> {
    if templates.is_empty() {
        bail!(
            "class folders need at least one caption template, such as {:?}",
            super::DEFAULT_TEMPLATE
        );
    }
    if let Some(t) = templates.iter().find(|t| !t.contains("{label}")) {
        bail!("caption template {t:?} has no {{label}}: every caption would be the same");
    }
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

    let root = absolute(root)?;
    let mut images = vec![];
    let mut pairs = vec![];
    let mut labels = vec![];
    for (label, files) in classes {
        let l = labels.len();
        for file in files {
            images.push(ImageEntry {
                path: root.join(&label).join(&file),
                name: format!("{label}/{file}"),
            });
            for t in templates {
                pairs.push(Pair {
                    image: images.len() - 1,
                    caption: render_template(t, &label),
                    label: Some(l),
                    line: 0,
                });
            }
        }
        labels.push(label);
    }
    Ok(Some(Dataset {
        image_root: root.clone(),
        root,
        source: Source::ClassFolders {
            templates: templates.to_vec(),
        },
        images,
        pairs,
        labels,
        bad: vec![],
    }))
}
