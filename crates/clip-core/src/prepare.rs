//! The data side of stages 3 and 4 (and prediction's evaluation): dataset → split → tokenizer →
//! decoded images → loader, with each step's problems reported as a clear error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::ClipConfig;
use crate::data::{BadRow, Dataset, ImageStore, LoadOptions, Loader, Split, StoreMode, TextTokenizer};
use crate::progress::Progress;

/// Which data to train on, and how strictly.
#[derive(Debug, Clone, Default)]
pub struct DataSource {
    /// A dataset folder or captions file; `None` is the demo set in `assets/demo`.
    pub path: Option<PathBuf>,
    /// Leave bad rows out (they are printed) instead of failing.
    pub skip_bad: bool,
    /// A `tokenizer.json` to use instead of training one on the training captions.
    pub tokenizer: Option<PathBuf>,
    /// Where decoded images are kept between runs.
    pub image_cache: ImageCache,
    /// Decode images per batch instead of up front (nothing cached, nothing checked first).
    pub stream: bool,
    /// Caption templates for class folders (`{label}` is the folder's name); empty: the default.
    pub templates: Vec<String>,
}

/// Where the decoded images of a dataset are kept (see [`crate::data::StoreMode`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ImageCache {
    /// The dataset's `.clipmine-cache/` folder.
    #[default]
    Default,
    /// Another folder (e.g. on a faster disk, or when the dataset's is read-only).
    Dir(PathBuf),
    /// No cache: every start decodes every image into memory.
    Off,
}

impl DataSource {
    /// The dataset's path (the demo set when none was given).
    pub fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(Dataset::demo_dir)
    }

    /// How the rows are read: failing on bad ones unless `skip_bad`, with the class-folder
    /// templates.
    pub fn load_options(&self) -> LoadOptions {
        let mut opts = LoadOptions {
            skip_bad: self.skip_bad,
            ..LoadOptions::default()
        };
        if !self.templates.is_empty() {
            opts.templates = self.templates.clone();
        }
        opts
    }

    /// How the image store holds the pixels.
    pub fn store_mode(&self) -> StoreMode {
        match (&self.image_cache, self.stream) {
            (_, true) => StoreMode::Stream,
            (ImageCache::Default, false) => StoreMode::Cache(None),
            (ImageCache::Dir(d), false) => StoreMode::Cache(Some(d.clone())),
            (ImageCache::Off, false) => StoreMode::Memory,
        }
    }
}

/// Everything a training stage needs from the data.
pub struct Prepared {
    /// Where the dataset was loaded from (as given: a folder, a captions file, shards).
    pub source: PathBuf,
    pub dataset: Dataset,
    pub split: Split,
    pub tokenizer: TextTokenizer,
    pub store: Arc<ImageStore>,
    pub device: Device,
    pub loader: Loader,
}

/// Loads and splits the dataset, gets a tokenizer (the source's file, else trained on the
/// training captions), decodes the images (or finds them in the image cache; or, streaming,
/// leaves them to the batches) and builds the loader. Stage 2 runs the same steps one at a time
/// ([`load`], [`Dataset::split`], [`tokenizer`]) to report on each.
pub fn prepare(cfg: &ClipConfig, source: &DataSource, device: &Device, progress: &dyn Progress) -> Result<Prepared> {
    let path = source.path();
    let (dataset, store, _) = load(cfg, source, &source.load_options(), &source.store_mode(), progress)
        .with_context(|| format!("loading the dataset {}", path.display()))?;
    if let Some(note) = store.note() {
        eprintln!("note: {note}");
    }
    for b in &dataset.bad {
        eprintln!("skipped: {b}");
    }
    let split = dataset.split(cfg.data.val_fraction, cfg.seed);
    let tokenizer = tokenizer(cfg, source.tokenizer.as_deref(), &dataset.captions_of(&split.train))?.tokenizer;
    let store = Arc::new(store);
    let loader = Loader::new(&dataset, store.clone(), &tokenizer, cfg, device)?;
    Ok(Prepared {
        source: path,
        dataset,
        split,
        tokenizer,
        store,
        loader,
        device: device.clone(),
    })
}

/// The dataset's rows, checked, and its images, decoded (or found in the image cache) as `mode`
/// says. Images are decoded before anything is split or counted, so with `opts.skip_bad` the
/// pairs of a broken image are gone first; the images that failed are returned too (they are
/// also in [`Dataset::bad`]).
pub fn load(
    cfg: &ClipConfig,
    source: &DataSource,
    opts: &LoadOptions,
    mode: &StoreMode,
    progress: &dyn Progress,
) -> Result<(Dataset, ImageStore, Vec<BadRow>)> {
    let mut ds = Dataset::load(&source.path(), opts)?;
    let (store, bad) = decode(&mut ds, cfg, mode, opts.skip_bad, progress)?;
    Ok((ds, store, bad))
}

/// The images of `ds`, decoded (or found in the image cache) as `mode` says; the pairs of images
/// that fail are dropped (with `skip_bad`; else their failure is the error) and the failures
/// returned (they are also added to [`Dataset::bad`]).
pub fn decode(
    ds: &mut Dataset,
    cfg: &ClipConfig,
    mode: &StoreMode,
    skip_bad: bool,
    progress: &dyn Progress,
) -> Result<(ImageStore, Vec<BadRow>)> {
    let (store, bad) = ImageStore::open(ds, cfg, mode, skip_bad, progress)?;
    ds.drop_undecodable(&store, bad.clone())?;
    Ok((store, bad))
}

/// Where a tokenizer came from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerOrigin {
    /// A `tokenizer.json` the user named.
    File(PathBuf),
    /// The pretrained CLIP's or text tower's own (`pretrained`, `text.pretrained`), from this
    /// file.
    Pretrained { model: String, file: PathBuf },
    /// WordPiece trained now on this many training captions.
    Trained(usize),
}

/// A tokenizer and where it came from.
pub struct ChosenTokenizer {
    pub tokenizer: TextTokenizer,
    pub origin: TokenizerOrigin,
}

/// The tokenizer training reads captions with: `file` when given, else the pretrained text
/// tower's own, else WordPiece trained on `train_captions`.
pub fn tokenizer(cfg: &ClipConfig, file: Option<&Path>, train_captions: &[String]) -> Result<ChosenTokenizer> {
    if let Some(f) = file {
        return Ok(ChosenTokenizer {
            tokenizer: TextTokenizer::from_file(f, cfg.max_tokens())?,
            origin: TokenizerOrigin::File(f.to_path_buf()),
        });
    }
    if let Some(model) = cfg.pretrained.as_ref().or(cfg.text.pretrained.as_ref()) {
        let (tokenizer, file) = crate::pretrained::tokenizer(cfg, &crate::hub::Hub::from_env())?
            .context("the pretrained text tower has no tokenizer")?;
        return Ok(ChosenTokenizer {
            tokenizer,
            origin: TokenizerOrigin::Pretrained {
                model: model.clone(),
                file,
            },
        });
    }
    Ok(ChosenTokenizer {
        tokenizer: TextTokenizer::train(train_captions, cfg.text.vocab_size, cfg.max_tokens())?,
        origin: TokenizerOrigin::Trained(train_captions.len()),
    })
}
