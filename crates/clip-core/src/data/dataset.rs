//! A dataset: images on disk and the (image, caption) pairs that use them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::captions::{self, CaptionFormat};
use super::folders::{self, render_template};
use super::paths::{absolute, contained, images_dir, relative_image_path};
use super::{list_bad, ImageStore};
use crate::config::ClipConfig;

/// The caption of a class-folder image when no template is given.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {label}";
/// Captions files looked for, in this order, when a dataset is given as a folder.
pub const CAPTION_FILES: [&str; 4] = ["captions.csv", "captions.tsv", "captions.txt", "captions.jsonl"];

/// An image file used by one or more pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Absolute path.
    pub path: PathBuf,
    /// As written in the captions file, or `label/file.jpg` for class folders.
    pub name: String,
}

/// One training example: an image and one of its captions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Index into [`Dataset::images`].
    pub image: usize,
    pub caption: String,
    /// Index into [`Dataset::labels`] (class folders only), kept for zero-shot evaluation.
    pub label: Option<usize>,
    /// 1-based line in the captions file; 0 for class folders.
    pub line: usize,
}

/// A row (or image) that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The captions file, or the image itself for class folders.
    pub file: PathBuf,
    /// 1-based line in `file`; 0 when the problem is a whole file (class-folder images).
    pub line: usize,
    pub reason: String,
}

impl BadRow {
    pub fn new(file: &Path, line: usize, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
}

/// `FILE:LINE: reason` (or `FILE: reason` when there is no line), as compilers write it, so
/// editors and terminals can jump to the row.
impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.reason),
            n => write!(f, "{}:{n}: {}", self.file.display(), self.reason),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Leave bad rows out (they are listed in [`Dataset::bad`]) instead of failing.
    pub skip_bad: bool,
    /// Caption templates for class folders; `{label}` is replaced by the folder name.
    pub templates: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            skip_bad: false,
            templates: vec![DEFAULT_TEMPLATE.to_string()],
        }
    }
}

/// Where the pairs came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Captions {
        file: PathBuf,
        format: CaptionFormat,
    },
    ClassFolders {
        templates: Vec<String>,
    },
    /// WebDataset tar shards; image i is the member at `members[i]` of its shard.
    WebDataset {
        shards: Vec<PathBuf>,
        members: Vec<super::MemberSpan>,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Captions { file, format } => {
                write!(f, "{format} captions file {}", file.display())
            }
            Source::ClassFolders { templates } => {
                write!(f, "class folders, captions from {templates:?}")
            }
            Source::WebDataset { shards, .. } => match shards.as_slice() {
                [one] => write!(f, "WebDataset shard {}", one.display()),
                [first, .., last] => write!(
                    f,
                    "{} WebDataset shards, {} … {}",
                    shards.len(),
                    first.display(),
                    last.display()
                ),
                [] => write!(f, "no WebDataset shards"),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// The dataset's folder (absolute): the captions file's folder, or the class folders' parent.
    pub root: PathBuf,
    /// The folder image names are resolved against first (`root/images` when it exists).
    pub image_root: PathBuf,
    pub source: Source,
    pub images: Vec<ImageEntry>,
    pub pairs: Vec<Pair>,
    /// Class names (class folders only), sorted; [`Pair::label`] indexes them.
    pub labels: Vec<String>,
    /// Rows left out (only non-empty with [`LoadOptions::skip_bad`]).
    pub bad: Vec<BadRow>,
}

impl Dataset {
    /// Loads a folder (with a `captions.{csv,tsv,txt,jsonl}` file, or class folders) or a captions
    /// file. Every row is checked; bad rows fail the load unless `opts.skip_bad` is set, and a
    /// dataset with no usable rows always fails.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
        if let Some(shards) = super::webdataset::shards(path)? {
            return Self::from_webdataset(shards, opts);
        }
        if path.is_file() {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if super::IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                bail!(
                    "{} is an image: a dataset is a folder (images + captions.csv, or class folders) or a captions file",
                    path.display()
                );
            }
            return Self::from_captions_file(path, opts);
        }
        if !path.is_dir() {
            bail!("dataset {} not found: give a folder (with images and captions.csv, or class folders) or a captions file", path.display());
        }
        if let Some(file) = CAPTION_FILES.iter().map(|n| path.join(n)).find(|p| p.is_file()) {
            return Self::from_captions_file(&file, opts);
        }
        let root = absolute(path)?;
        match folders::scan(&root)? {
            Some(found) => Self::from_class_folders(root, found, opts),
            None => bail!(
                "{}: no captions file ({}) and no class folders with images (label/*.jpg): nothing to train on",
                path.display(),
                CAPTION_FILES.join(", ")
            ),
        }
    }

    /// The repository's demo set (`assets/demo`): 10 images, 30 captions in Chinese and English.
    pub fn demo_dir() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
        dir.canonicalize().unwrap_or(dir)
    }

    /// Loads a dataset and decodes its images (see [`ImageStore::load`]). With `skip_bad`, the
    /// pairs of images that cannot be decoded are dropped and listed in [`Dataset::bad`].
    pub fn load_with_images(
        path: &Path,
        opts: &LoadOptions,
        cfg: &ClipConfig,
        progress: &dyn crate::progress::Progress,
    ) -> Result<(Dataset, ImageStore)> {
        let mut ds = Self::load(path, opts)?;
        let (store, bad) = ImageStore::load(&ds, cfg, opts.skip_bad, progress)?;
        ds.drop_undecodable(&store, bad)?;
        Ok((ds, store))
    }

    /// Drops the pairs whose image is not in `store` and records `bad` (what [`ImageStore::load`]
    /// returned). Pair indices change; image indices do not. Fails when no pair is left.
    pub fn drop_undecodable(&mut self, store: &ImageStore, bad: Vec<BadRow>) -> Result<()> {
        self.pairs.retain(|p| store.contains(p.image));
        self.bad.extend(bad);
        self.bad.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        if self.pairs.is_empty() {
            bail!(
                "{}: no image could be decoded:{}",
                self.source_path().display(),
                list_bad(&self.bad)
            );
        }
        Ok(())
    }

    /// Every caption, in pair order.
    pub fn captions(&self) -> Vec<String> {
        self.pairs.iter().map(|p| p.caption.clone()).collect()
    }

    /// The captions of some pairs (e.g. the training side of a split, to train a tokenizer on).
    pub fn captions_of(&self, pairs: &[usize]) -> Vec<String> {
        pairs.iter().map(|&i| self.pairs[i].caption.clone()).collect()
    }

    /// How many pairs use each image (0 for images whose pairs were dropped).
    pub fn captions_per_image(&self) -> Vec<usize> {
        let mut n = vec![0; self.images.len()];
        for p in &self.pairs {
            n[p.image] += 1;
        }
        n
    }

    /// The file errors are reported against: the captions file, or the root of class folders.
    /// xxh3-128 of what training sees of the dataset, in order: each image's name, each pair's
    /// image, caption and label, the class names. The same listing gives the same fingerprint
    /// wherever the files are; another caption, image or order gives another. 32 hex digits.
    pub fn listing_fingerprint(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for e in &self.images {
            field(e.name.as_bytes());
        }
        for p in &self.pairs {
            field(&(p.image as u64).to_le_bytes());
            field(p.caption.as_bytes());
            field(&p.label.map_or(u64::MAX, |l| l as u64).to_le_bytes());
        }
        for l in &self.labels {
            field(l.as_bytes());
        }
        format!("{:032x}", h.digest128())
    }

    pub fn source_path(&self) -> &Path {
        match &self.source {
            Source::Captions { file, .. } => file,
            Source::ClassFolders { .. } => &self.root,
            Source::WebDataset { shards, .. } => shards.first().map_or(&self.root, |s| s.as_path()),
        }
    }

    /// Pairs from a class-folder scan: one caption per template and image, each keeping its label.
    fn from_class_folders(root: PathBuf, found: folders::ClassFolders, opts: &LoadOptions) -> Result<Dataset> {
        let templates = &opts.templates;
        if templates.is_empty() {
            bail!("class folders need at least one caption template, such as {DEFAULT_TEMPLATE:?}");
        }
        if let Some(t) = templates.iter().find(|t| !t.contains("{label}")) {
            bail!("caption template {t:?} has no {{label}}: every caption would be the same");
        }
        let mut images = vec![];
        let mut pairs = vec![];
        for img in found.images {
            for t in templates {
                pairs.push(Pair {
                    image: images.len(),
                    caption: render_template(t, &found.labels[img.label]),
                    label: Some(img.label),
                    line: 0,
                });
            }
            images.push(ImageEntry {
                path: img.path,
                name: img.name,
            });
        }
        Dataset {
            image_root: root.clone(),
            root,
            source: Source::ClassFolders {
                templates: templates.to_vec(),
            },
            images,
            pairs,
            labels: found.labels,
            bad: found.bad,
        }
        .check_rows(opts)
    }

    fn from_captions_file(file: &Path, opts: &LoadOptions) -> Result<Dataset> {
        let parsed = captions::read(file)?;
        let root = absolute(
            file.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
        let image_root = images_dir(&root).unwrap_or_else(|| root.clone());
        // Names are tried under `images/` first, then next to the captions file, so both
        // `a.jpg` and `images/a.jpg` work in a folder laid out as `captions.csv` + `images/`.
        let bases: Vec<&Path> = if image_root != root {
            vec![&image_root, &root]
        } else {
            vec![&root]
        };

        let mut images: Vec<ImageEntry> = vec![];
        let mut pairs = vec![];
        let mut bad = parsed.bad;
        // Each name is looked up once; names of the same file (`a.jpg`, `images/a.jpg`) share an
        // entry, so a split can never put one picture on both sides.
        let mut found: HashMap<PathBuf, std::result::Result<PathBuf, String>> = HashMap::new();
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        for row in parsed.rows {
            let path = relative_image_path(&row.image).and_then(|rel| {
                found
                    .entry(rel.clone())
                    .or_insert_with(|| {
                        bases
                            .iter()
                            .map(|b| b.join(&rel))
                            .find(|p| p.is_file())
                            .ok_or_else(|| {
                                format!("image not found: {} (looked in {})", row.image, image_root.display())
                            })
                            // A symlink (the file, or a folder on its way) must not lead out.
                            .and_then(|p| contained(&root, &p))
                    })
                    .clone()
            });
            match path {
                Ok(path) => {
                    let image = *index.entry(path.clone()).or_insert_with(|| {
                        images.push(ImageEntry {
                            path,
                            name: row.image.clone(),
                        });
                        images.len() - 1
                    });
                    pairs.push(Pair {
                        image,
                        caption: row.caption,
                        label: None,
                        line: row.line,
                    });
                }
                Err(reason) => bad.push(BadRow::new(file, row.line, reason)),
            }
        }
        bad.sort_by_key(|b| b.line);
        let ds = Dataset {
            root,
            image_root,
            source: Source::Captions {
                file: file.to_path_buf(),
                format: parsed.format,
            },
            images,
            pairs,
            labels: vec![],
            bad,
        };
        ds.check_rows(opts)
    }

    /// Applies the bad-row policy: no usable rows is always an error; bad rows are one unless skipped.
    pub(crate) fn check_rows(self, opts: &LoadOptions) -> Result<Self> {
        let file = self.source_path().display();
        if self.pairs.is_empty() {
            bail!("{file}: no usable rows ({} bad){}", self.bad.len(), list_bad(&self.bad));
        }
        if !opts.skip_bad && !self.bad.is_empty() {
            bail!(
                "{file}: {} bad rows (of {}):{}\nfix them, or leave them out with --skip-bad",
                self.bad.len(),
                self.bad.len() + self.pairs.len(),
                list_bad(&self.bad)
            );
        }
        Ok(self)
    }
}
