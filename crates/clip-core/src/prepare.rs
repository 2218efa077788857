//! The data side of stages 3 and 4 (and prediction's evaluation): dataset → split → tokenizer →
//! decoded images → loader, with each step's problems reported as a clear error.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::ClipConfig;
use crate::data::{Dataset, ImageStore, LoadOptions, Loader, Split, StoreMode, TextTokenizer};
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
/// leaves them to the batches) and builds the loader.
pub fn prepare(cfg: &ClipConfig, source: &DataSource, device: &Device, progress: &dyn Progress) -> Result<Prepared> {
    let path = source.path();
    let opts = LoadOptions {
        skip_bad: source.skip_bad,
        ..LoadOptions::default()
    };
    // Images are decoded before the split and the tokenizer, so with --skip-bad the pairs of a
    // broken image are gone before anything counts them.
    let (dataset, store) = (|| {
        let mut ds = Dataset::load(&path, &opts)?;
        let (store, bad) = ImageStore::open(&ds, cfg, &source.store_mode(), opts.skip_bad, progress)?;
        ds.drop_undecodable(&store, bad)?;
        anyhow::Ok((ds, store))
    })()
    .with_context(|| format!("loading the dataset {}", path.display()))?;
    if let Some(note) = store.note() {
        eprintln!("note: {note}");
    }
    for b in &dataset.bad {
        eprintln!("skipped: {b}");
    }
    let split = dataset.split(cfg.data.val_fraction, cfg.seed);
    let tokenizer = match &source.tokenizer {
        Some(file) => TextTokenizer::from_file(file, cfg.max_tokens())?,
        // A pretrained text tower reads text with its own tokenizer.
        None if cfg.text.pretrained.is_some() => {
            crate::pretrained::tokenizer(cfg, &crate::hub::Hub::from_env())?
                .context("the pretrained text tower has no tokenizer")?
                .0
        }
        None => {
            let captions: Vec<String> = split.train.iter().map(|&i| dataset.pairs[i].caption.clone()).collect();
            TextTokenizer::train(&captions, cfg.text.vocab_size, cfg.max_tokens())?
        }
    };
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
