//! Image–caption data: datasets, the image store, the tokenizer and the batch loader.
//!
//! The pipeline is built so that data is never the bottleneck and never the surprise:
//!
//! 1. [`Dataset::load`] reads a captions file (CSV, TSV, `|`-separated or JSON Lines) or class
//!    folders into [`Pair`]s, checking every row (missing images, empty captions, bad UTF-8 …) and
//!    naming the file and line of each problem.
//! 2. [`ImageStore::open`] decodes every image once, in parallel, into u8 RGB at the model's size,
//!    so a corrupt file is found up front and an epoch costs no decoding; the pixels go to the
//!    image cache on disk (reused by later runs), to memory, or nowhere when
//!    streaming. WebDataset tar shards are read in place.
//! 3. [`TextTokenizer`] turns captions into WordPiece ids (trained on the captions, so Chinese
//!    characters are tokens of their own rather than `[UNK]`).
//! 4. [`Loader`] shuffles pairs per epoch and builds [`Batch`]es on a background thread.
//!
//! [`Dataset::split`] holds out whole images for validation, so no caption of a validation image
//! is ever trained on.

mod cache;
mod captions;
mod dataset;
mod features;
mod folders;
mod image;
mod loader;
mod origin;
mod paths;
mod split;
mod store;
mod tokenizer;
mod types;
mod webdataset;
mod wordpiece;

pub use cache::{CacheReport, CACHE_DIR};
pub use features::{FeatureRows, FrozenFeatures};
pub use folders::{default_ensemble, read_templates, render_template, ENSEMBLE_EN, ENSEMBLE_ZH};
pub use image::{
    normalised_range, Preprocess, IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTENSIONS, MAX_DECODE_BYTES, MAX_IMAGE_SIDE,
};
pub use loader::{epoch_seed, Augment, Batch, Batches, GlobalBatch, Loader, Shard};
pub use paths::{absolute, contained, image_files, relative_image_path, Listing};
pub use split::{Split, MIN_IMAGES_TO_SPLIT};
pub use store::{CropSeed, ImageStore, StoreMode};
pub use tokenizer::{TextTokenizer, UnkReport, SPECIAL_TOKENS};
pub use types::{BadRow, CaptionFormat, Dataset, ImageEntry, LoadOptions, MemberSpan, Pair, Source, DEFAULT_TEMPLATE};
pub use webdataset::expand_braces;

pub(crate) use crate::rng::mix;
