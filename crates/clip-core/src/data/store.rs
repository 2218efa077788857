//! Every image of a dataset at the model's size: decoded once and kept in memory, mapped from the
//! on-disk image cache, or decoded on the fly (streaming).
//!
//! Decoding a JPEG costs milliseconds; normalising a 64×64 (or 224×224) u8 image costs
//! microseconds. Decoding all images once makes every epoch after the first free of decoding,
//! and finds every unreadable file before training starts rather than hours in. The pixels take
//! 3·S² bytes per image (12 KiB at 64 px, 147 KiB at 224 px), so where they live matters:
//!
//! - [`StoreMode::Cache`] (the default of the stages): in the on-disk image cache
//!   ([`super::cache`]), each batch reading its images' slots (the operating system's page cache
//!   keeps what fits), reused by the next start;
//! - [`StoreMode::Memory`]: in this process's memory (small datasets, prediction);
//! - [`StoreMode::Stream`]: nowhere — each batch decodes its images again, on the store's own
//!   thread pool (not the global one the kernels use). Nothing is checked up front: a broken
//!   file stops the epoch that reaches it (stage 2 checks every image).
//!
//! With augmentation on, training images are always decoded from the original file (a random
//! resized crop of the full-resolution photo, as torchvision does), whatever the mode: that costs
//! a decode per image per epoch, the streaming path's cost.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cache::{self, CacheReport, CACHE_DIR};
use super::image::{augment_original, fit, normalise_into, prepare, to_rgb, Preprocess};
use super::mix;
use super::origin::{origins, Origin};
use super::types::{list_bad, BadRow, Dataset, LoadOptions, Source};
use crate::config::ClipConfig;
use crate::progress::Progress;

/// Which random crop (and flip) each image of an augmented batch gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropSeed {
    /// Drawn from this batch seed and the image's position in the batch: new crops every
    /// epoch (plain `--augment`).
    Batch(u64),
    /// [`CropSeed::Batch`] for the images from position `first` of a batch on: one rank's share
    /// of a global batch draws the crops the whole batch draws in one process.
    BatchFrom { seed: u64, first: usize },
    /// View `v` of each image: the crop depends only on `v` and the image's index, so it is the
    /// same whenever, and by whichever model, it is asked for. A distillation teacher embeds
    /// each view once; the student trains on the same crops (MobileCLIP's reinforced data).
    View(u64),
}

impl CropSeed {
    /// The seed of the `k`-th image of a batch, image `image` of the store.
    pub fn seed(self, k: usize, image: usize) -> u64 {
        match self {
            CropSeed::Batch(seed) => mix(seed, k as u64),
            CropSeed::BatchFrom { seed, first } => mix(seed, (first + k) as u64),
            CropSeed::View(v) => mix(mix(0x7669_6577, v), image as u64),
        }
    }
}

/// Where a store keeps its pixels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreMode {
    /// The on-disk image cache in this folder; `None`: `<dataset>/.clipmine-cache/`.
    Cache(Option<PathBuf>),
    /// Decoded up front into this process's memory.
    #[default]
    Memory,
    /// Decoded per batch, nothing kept.
    Stream,
}

enum Pixels {
    Memory(Vec<u8>),
    /// The image cache's data file, read a slot at a time and checked against its slot's sum.
    Cached {
        file: std::fs::File,
        path: PathBuf,
        sums: Vec<Option<u64>>,
    },
    Stream,
}

/// The image size and count (not the pixels) when debug-printed.
pub struct ImageStore {
    size: usize,
    prep: Preprocess,
    /// Bytes from one image's start to the next's.
    stride: usize,
    pixels: Pixels,
    /// Where image i's pixels are (`slot × stride`); `None` where it could not be decoded.
    slots: Vec<Option<usize>>,
    /// Where each image's original is, to decode it again (streaming, augmentation).
    origins: Arc<Vec<Origin>>,
    /// The decoding threads of streaming and augmentation, made when first needed.
    pool: OnceLock<Result<rayon::ThreadPool, String>>,
    cache: Option<CacheReport>,
    /// Why the store is not what was asked for (an unwritable cache folder), when it is not.
    note: Option<String>,
    /// Cache slots found damaged on reading (checksum mismatch) and decoded again.
    repaired: AtomicUsize,
}

impl ImageStore {
    /// Decodes every image of `ds` in parallel to `cfg.image.image_size` pixels, into memory.
    /// Images that fail become [`BadRow`]s naming the captions line that first used them; without
    /// `skip_bad` any failure is an error listing them. `progress` hears of each decoded image.
    pub fn load(
        ds: &Dataset,
        cfg: &ClipConfig,
        skip_bad: bool,
        progress: &dyn Progress,
    ) -> Result<(ImageStore, Vec<BadRow>)> {
        Self::open(ds, cfg, &StoreMode::Memory, skip_bad, progress)
    }

    /// The images of `ds`, held as `mode` says (see the module's documentation). An image cache
    /// folder that cannot be written falls back to memory, and [`ImageStore::note`] says so.
    pub fn open(
        ds: &Dataset,
        cfg: &ClipConfig,
        mode: &StoreMode,
        skip_bad: bool,
        progress: &dyn Progress,
    ) -> Result<(ImageStore, Vec<BadRow>)> {
        let prep = Preprocess::from_config(cfg);
        let size = prep.size;
        let origins = Arc::new(origins(ds));
        let n = origins.len();
        let per = 3 * size * size;
        let mut store = ImageStore {
            size,
            prep,
            stride: per,
            pixels: Pixels::Stream,
            slots: (0..n).map(Some).collect(),
            origins: origins.clone(),
            pool: OnceLock::new(),
            cache: None,
            note: None,
            repaired: AtomicUsize::new(0),
        };
        let decode = |o: &Origin| -> Result<Vec<u8>> { Ok(fit(&to_rgb(o.decode()?), &prep).into_raw()) };
        let errors: Vec<Option<String>> = match mode {
            StoreMode::Stream => return Ok((store, vec![])),
            StoreMode::Cache(dir) => {
                let dir = dir.clone().unwrap_or_else(|| ds.root.join(CACHE_DIR));
                match cache::open(
                    &dir,
                    ds.source_path(),
                    &origins,
                    size,
                    &prep.cache_variant(),
                    &decode,
                    progress,
                ) {
                    Ok(c) => {
                        store.stride = c.stride;
                        store.pixels = Pixels::Cached {
                            file: c.file,
                            path: c.path,
                            sums: c.sums,
                        };
                        store.slots = c.slots;
                        store.cache = Some(c.report);
                        c.errors
                    }
                    Err(e) => {
                        store.note = Some(format!(
                            "no image cache ({e:#}): images are kept in memory; name a writable folder with --image-cache DIR"
                        ));
                        store.decode_into_memory(&decode, progress)
                    }
                }
            }
            StoreMode::Memory => store.decode_into_memory(&decode, progress),
        };
        let bad = bad_rows(ds, &origins, &errors);
        if !skip_bad && !bad.is_empty() {
            bail!(
                "{} images cannot be decoded:{}\nreplace them, or leave their captions out with --skip-bad",
                bad.len(),
                list_bad(&bad)
            );
        }
        Ok((store, bad))
    }

    fn decode_into_memory(
        &mut self,
        decode: &(dyn Fn(&Origin) -> Result<Vec<u8>> + Sync),
        progress: &dyn Progress,
    ) -> Vec<Option<String>> {
        let per = 3 * self.size * self.size;
        let n = self.origins.len();
        let mut pixels = vec![0u8; n * per];
        progress.start("decoding images", n as u64);
        let errors: Vec<Option<String>> = pixels
            .par_chunks_mut(per.max(1))
            .zip(self.origins.par_iter())
            .map(|(dst, o)| {
                let r = decode(o);
                progress.inc(1);
                match r {
                    Ok(px) => {
                        dst.copy_from_slice(&px);
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                }
            })
            .collect();
        progress.finish();
        self.stride = per;
        self.slots = errors
            .iter()
            .enumerate()
            .map(|(i, e)| e.is_none().then_some(i))
            .collect();
        self.pixels = Pixels::Memory(pixels);
        errors
    }

    /// Side of the stored square images, in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How the stored images were made, and how they are normalised.
    pub fn preprocess(&self) -> &Preprocess {
        &self.prep
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether image `i` was decoded (always, for a streaming store: it checks nothing up front).
    pub fn contains(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(Option::is_some)
    }

    /// Memory of this process held by the pixels (0 when mapped from the cache or streamed).
    pub fn bytes(&self) -> usize {
        match &self.pixels {
            Pixels::Memory(p) => p.len(),
            _ => 0,
        }
    }

    /// True when batches decode their images from the files (nothing is kept).
    pub fn is_streaming(&self) -> bool {
        matches!(self.pixels, Pixels::Stream)
    }

    /// What the image cache held, when the pixels come from it.
    pub fn cache(&self) -> Option<&CacheReport> {
        self.cache.as_ref()
    }

    /// Why the store is not what was asked for, when it is not.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Image `i` as HWC u8 RGB, S×S: borrowed from memory, read from the cache, or decoded now
    /// when streaming. `None` when the image was not decoded (see [`ImageStore::contains`]); an
    /// error when reading or decoding it fails now.
    pub fn rgb(&self, i: usize) -> Result<Option<Cow<'_, [u8]>>> {
        let per = 3 * self.size * self.size;
        let Some(slot) = self.slots.get(i).copied().flatten() else {
            return Ok(None);
        };
        Ok(Some(match &self.pixels {
            Pixels::Memory(p) => Cow::Borrowed(&p[slot * self.stride..][..per]),
            Pixels::Cached { .. } => {
                let mut px = vec![0u8; per];
                self.read_slot(i, slot, &mut px)?;
                Cow::Owned(px)
            }
            Pixels::Stream => Cow::Owned(self.decode_fitted(i)?),
        }))
    }

    /// Cache slots found damaged (checksum mismatch) since the store was opened, and decoded
    /// again from their files.
    pub fn repaired(&self) -> usize {
        self.repaired.load(Ordering::Relaxed)
    }

    /// Reads image `i`'s cache slot into `px` and checks it against its checksum. A damaged slot
    /// (a bit flipped on disk) is decoded again from the original, written back to the cache
    /// (best effort: a read-only cache is only read) and counted in [`ImageStore::repaired`].
    fn read_slot(&self, i: usize, slot: usize, px: &mut [u8]) -> Result<()> {
        let Pixels::Cached { file, path, sums } = &self.pixels else {
            unreachable!("only for a cached store")
        };
        let offset = (slot * self.stride) as u64;
        cache::read_at(file, px, offset)
            .with_context(|| format!("reading slot {slot} of the image cache {}", path.display()))?;
        if sums.get(i).copied().flatten() == Some(cache::slot_sum(px)) {
            return Ok(());
        }
        let fresh = self.decode_fitted(i)?;
        px.copy_from_slice(&fresh);
        if self.repaired.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!(
                "warning: the image cache {} has a damaged slot ({}): decoded again from the file",
                path.display(),
                self.origins[i].describe()
            );
        }
        if let Ok(w) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = cache::write_at(&w, px, offset);
        }
        Ok(())
    }

    fn decode_fitted(&self, i: usize) -> Result<Vec<u8>> {
        let o = &self.origins[i];
        let img = o
            .decode()
            .map_err(|e| anyhow::anyhow!("{}: cannot decode image: {e:#}", o.describe()))?;
        Ok(fit(&to_rgb(img), &self.prep).into_raw())
    }

    fn pool(&self) -> Result<&rayon::ThreadPool> {
        self.pool
            .get_or_init(|| {
                let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("clipmine-decode-{i}"))
                    .build()
                    .map_err(|e| format!("cannot start the decoding threads: {e}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Normalised CHW f32 values of some images, back to back (B·3·S·S), built in parallel.
    /// With `augment_seed`, each image is a random resized crop of its original file, flipped
    /// half the time, derived from the seed and its position in the batch (decoded now, on the
    /// store's own threads).
    pub fn batch_pixels(&self, image_indices: &[usize], augment_seed: Option<u64>) -> Result<Vec<f32>> {
        self.crop_pixels(image_indices, augment_seed.map(CropSeed::Batch))
    }

    /// [`ImageStore::batch_pixels`] with each image's random crop chosen by `crop` (`None`: no
    /// augmentation).
    pub fn crop_pixels(&self, image_indices: &[usize], crop: Option<CropSeed>) -> Result<Vec<f32>> {
        let per = 3 * self.size * self.size;
        if let Some(&i) = image_indices.iter().find(|&&i| !self.contains(i)) {
            if i < self.len() {
                bail!("image {i} was not decoded: drop its pairs first (Dataset::drop_undecodable)")
            }
            bail!("image index {i} is out of range: the store holds {} images", self.len())
        }
        let mut out = vec![0f32; image_indices.len() * per];
        if crop.is_some() || self.is_streaming() {
            self.pool()?.install(|| {
                out.par_chunks_mut(per.max(1))
                    .zip(image_indices.par_iter())
                    .enumerate()
                    .try_for_each(|(k, (dst, &i))| -> Result<()> {
                        match crop {
                            Some(crop) => {
                                let o = &self.origins[i];
                                let img = o
                                    .decode()
                                    .map_err(|e| anyhow::anyhow!("{}: cannot decode image: {e:#}", o.describe()))?;
                                augment_original(&to_rgb(img), &self.prep, crop.seed(k, i), dst);
                            }
                            None => normalise_into(&self.decode_fitted(i)?, &self.prep, dst),
                        }
                        Ok(())
                    })
            })?;
            return Ok(out);
        }
        let slots: Vec<usize> = image_indices
            .iter()
            .map(|&i| self.slots[i].expect("checked above"))
            .collect();
        match &self.pixels {
            Pixels::Memory(bytes) => out
                .par_chunks_mut(per.max(1))
                .zip(slots.par_iter())
                .for_each(|(dst, &s)| normalise_into(&bytes[s * self.stride..][..per], &self.prep, dst)),
            Pixels::Cached { .. } => out
                .par_chunks_mut(per.max(1))
                .zip(slots.par_iter().zip(image_indices.par_iter()))
                .try_for_each_init(
                    || vec![0u8; per],
                    |px, (dst, (&s, &i))| -> Result<()> {
                        self.read_slot(i, s, px)?;
                        normalise_into(px, &self.prep, dst);
                        Ok(())
                    },
                )?,
            Pixels::Stream => unreachable!("handled above"),
        }
        Ok(out)
    }

    /// A batch of images as a (B, 3, S, S) f32 tensor.
    pub fn batch_tensor(&self, image_indices: &[usize], augment_seed: Option<u64>, device: &Device) -> Result<Tensor> {
        self.crop_tensor(image_indices, augment_seed.map(CropSeed::Batch), device)
    }

    /// A key of image `i`'s original bytes (an xxh3-128 of the file or tar member): what its
    /// augmented views are cached under.
    pub fn original_key(&self, i: usize) -> Result<[u8; 16]> {
        let o = self
            .origins
            .get(i)
            .with_context(|| format!("image index {i} is out of range: the store holds {} images", self.len()))?;
        o.content_hash()
    }

    /// [`ImageStore::batch_tensor`] with each image's crop chosen by `crop`.
    pub fn crop_tensor(&self, image_indices: &[usize], crop: Option<CropSeed>, device: &Device) -> Result<Tensor> {
        let s = self.size;
        let data = self.crop_pixels(image_indices, crop)?;
        Ok(Tensor::from_vec(data, (image_indices.len(), 3, s, s), device)?)
    }

    /// One image file prepared exactly as for training, without augmentation: (3, S, S), for
    /// prediction.
    pub fn load_one(path: &Path, cfg: &ClipConfig) -> Result<Tensor> {
        let prep = Preprocess::from_config(cfg);
        let s = prep.size;
        let rgb =
            prepare(path, &prep).map_err(|e| anyhow::anyhow!("{}: cannot decode image: {e:#}", path.display()))?;
        let mut out = vec![0f32; 3 * s * s];
        normalise_into(rgb.as_raw(), &prep, &mut out);
        Ok(Tensor::from_vec(out, (3, s, s), &Device::Cpu)?)
    }
}

impl Dataset {
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
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let decoded = self.slots.iter().filter(|s| s.is_some()).count();
        let mode = match self.pixels {
            Pixels::Memory(_) => "memory",
            Pixels::Cached { .. } => "cache",
            Pixels::Stream => "stream",
        };
        f.debug_struct("ImageStore")
            .field("size", &self.size)
            .field("images", &self.len())
            .field("decoded", &decoded)
            .field("mode", &mode)
            .finish()
    }
}

/// One bad row per image that failed, at the first line that used it (captions files), at the
/// image itself (class folders) or at its shard and member (WebDataset).
fn bad_rows(ds: &Dataset, origins: &[Origin], errors: &[Option<String>]) -> Vec<BadRow> {
    let mut first_line: HashMap<usize, (usize, usize)> = HashMap::new();
    for p in &ds.pairs {
        let e = first_line.entry(p.image).or_insert((p.line, 0));
        e.1 += 1;
    }
    let mut bad: Vec<BadRow> = errors
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let e = e.as_ref()?;
            let img = &ds.images[i];
            let (line, uses) = first_line.get(&i).copied().unwrap_or((0, 0));
            Some(match &ds.source {
                Source::Captions { file, .. } => {
                    let more = if uses > 1 {
                        format!(" (used by {uses} captions)")
                    } else {
                        String::new()
                    };
                    BadRow::new(file, line, format!("cannot decode image {}{more}: {e}", img.name))
                }
                Source::ClassFolders { .. } | Source::Images => {
                    BadRow::new(&img.path, 0, format!("cannot decode image: {e}"))
                }
                Source::WebDataset { .. } => BadRow::new(
                    Path::new(&origins[i].describe()),
                    0,
                    format!("cannot decode image: {e}"),
                ),
            })
        })
        .collect();
    bad.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    bad
}
