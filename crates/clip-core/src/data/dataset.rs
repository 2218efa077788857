//! A dataset: images on disk and the (image, caption) pairs that use them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::captions;
use super::folders::{self, render_template};
use super::paths::{absolute, contained, images_dir, relative_image_path};
use super::types::list_bad;
use super::types::{BadRow, Dataset, ImageEntry, LoadOptions, Pair, Source, CAPTION_FILES, DEFAULT_TEMPLATE};

impl Dataset {
    /// Loads a folder (with a `captions.{csv,tsv,txt,jsonl}` file, or class folders) or a captions
    /// file. Every row is checked; bad rows fail the load unless `opts.skip_bad` is set, and a
    /// dataset with no usable rows always fails.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
        if let Some(shards) = super::webdataset::shards(path)? {
            return super::webdataset::read(shards)?.check_rows(opts);
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
        if let Some(found) = folders::scan(&root)? {
            return Self::from_class_folders(root, found, opts);
        }
        let (images, bad) = folders::scan_flat(&root, &root)?;
        if images.is_empty() && bad.is_empty() {
            bail!(
                "{}: no captions file ({}), no class folders with images (label/*.jpg) and no images: nothing to train on",
                path.display(),
                CAPTION_FILES.join(", ")
            );
        }
        Self::from_images(root, images, bad, opts)
    }

    /// Images without captions: one pair per image with an empty caption, so batches, splits
    /// and caches work as for any dataset, while [`Dataset::captionless`] tells training that
    /// only the image side means anything.
    fn from_images(
        root: PathBuf,
        found: Vec<folders::FolderImage>,
        bad: Vec<super::BadRow>,
        opts: &LoadOptions,
    ) -> Result<Dataset> {
        let mut images = vec![];
        let mut pairs = vec![];
        for img in found {
            pairs.push(Pair {
                image: images.len(),
                caption: String::new(),
                label: None,
                line: 0,
            });
            images.push(ImageEntry {
                path: img.path,
                name: img.name,
            });
        }
        Dataset {
            image_root: root.clone(),
            root,
            source: Source::Images,
            images,
            pairs,
            labels: vec![],
            bad,
        }
        .check_rows(opts)
    }

    /// Images without captions (a folder of photos alone): they can distil an image tower from a
    /// teacher's image embeddings, and nothing else — no caption to align an image with.
    pub fn captionless(&self) -> bool {
        matches!(self.source, Source::Images)
    }

    /// The repository's demo set (`assets/demo`): 10 images, 30 captions in Chinese and English.
    pub fn demo_dir() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
        dir.canonicalize().unwrap_or(dir)
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

    /// The file errors are reported against: the captions file, or the root of class folders.
    pub fn source_path(&self) -> &Path {
        match &self.source {
            Source::Captions { file, .. } => file,
            Source::ClassFolders { .. } | Source::Images => &self.root,
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
