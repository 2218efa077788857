//! Every image of a dataset, decoded once at the model's size and kept in memory.
//!
//! Decoding a JPEG costs milliseconds; normalising a 64×64 (or 224×224) u8 image costs
//! microseconds. Decoding all images up front, in parallel, makes every epoch after the first
//! free of decoding, and finds every unreadable file before training starts rather than hours in.
//! The price is memory: 3·S² bytes per image (12 KiB at 64 px, 147 KiB at 224 px).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::image::{augment_into, normalise_into, prepare};
use super::{list_bad, mix, BadRow, Dataset, Source};
use crate::config::ClipConfig;
use crate::progress::Progress;

/// The image size and count (not the pixels) when debug-printed.
pub struct ImageStore {
    size: usize,
    /// Image i is `pixels[i·3·S² ..][..3·S²]`, HWC u8 RGB.
    pixels: Vec<u8>,
    /// False where the image could not be decoded (its pixels are zeros).
    decoded: Vec<bool>,
}

impl ImageStore {
    /// Decodes every image of `ds` in parallel to `cfg.image.image_size` pixels. Images that fail
    /// become [`BadRow`]s naming the captions line that first used them; without `skip_bad` any
    /// failure is an error listing them. `progress` hears of each decoded image.
    pub fn load(
        ds: &Dataset,
        cfg: &ClipConfig,
        skip_bad: bool,
        progress: &dyn Progress,
    ) -> Result<(ImageStore, Vec<BadRow>)> {
        let size = cfg.image.image_size;
        let n = ds.images.len();
        let per = 3 * size * size;
        let mut pixels = vec![0u8; n * per];
        progress.start("decoding images", n as u64);
        let errors: Vec<Option<String>> = pixels
            .par_chunks_mut(per.max(1))
            .zip(ds.images.par_iter())
            .map(|(dst, entry)| {
                let r = prepare(&entry.path, size as u32, cfg.data.center_crop);
                progress.inc(1);
                match r {
                    Ok(img) => {
                        dst.copy_from_slice(img.as_raw());
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                }
            })
            .collect();
        progress.finish();

        let decoded: Vec<bool> = errors.iter().map(Option::is_none).collect();
        let bad = bad_rows(ds, &errors);
        if !skip_bad && !bad.is_empty() {
            bail!(
                "{} images cannot be decoded:{}\nreplace them, or leave their captions out with --skip-bad",
                bad.len(),
                list_bad(&bad)
            );
        }
        Ok((ImageStore { size, pixels, decoded }, bad))
    }

    /// Side of the stored square images, in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn len(&self) -> usize {
        self.decoded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    /// Whether image `i` was decoded.
    pub fn contains(&self, i: usize) -> bool {
        self.decoded.get(i).copied().unwrap_or(false)
    }

    /// Memory held by the pixels.
    pub fn bytes(&self) -> usize {
        self.pixels.len()
    }

    /// Image `i` as HWC u8 RGB, S×S.
    pub fn rgb(&self, i: usize) -> Option<&[u8]> {
        let per = 3 * self.size * self.size;
        self.contains(i).then(|| &self.pixels[i * per..(i + 1) * per])
    }

    /// Normalised CHW f32 values of some images, back to back (B·3·S·S), built in parallel.
    /// With `augment_seed`, each image gets its own random crop and flip, derived from the seed and
    /// its position in the batch.
    pub fn batch_pixels(&self, image_indices: &[usize], augment_seed: Option<u64>) -> Result<Vec<f32>> {
        let per = 3 * self.size * self.size;
        let sources = image_indices
            .iter()
            .map(|&i| match self.rgb(i) {
                Some(rgb) => Ok(rgb),
                None if i < self.len() => {
                    bail!("image {i} was not decoded: drop its pairs first (Dataset::drop_undecodable)")
                }
                None => bail!("image index {i} is out of range: the store holds {} images", self.len()),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; image_indices.len() * per];
        out.par_chunks_mut(per.max(1))
            .zip(sources.par_iter())
            .enumerate()
            .for_each(|(k, (dst, rgb))| match augment_seed {
                Some(seed) => augment_into(rgb, self.size, mix(seed, k as u64), dst),
                None => normalise_into(rgb, self.size, dst),
            });
        Ok(out)
    }

    /// A batch of images as a (B, 3, S, S) f32 tensor.
    pub fn batch_tensor(&self, image_indices: &[usize], augment_seed: Option<u64>, device: &Device) -> Result<Tensor> {
        let s = self.size;
        let data = self.batch_pixels(image_indices, augment_seed)?;
        Ok(Tensor::from_vec(data, (image_indices.len(), 3, s, s), device)?)
    }

    /// One image file prepared exactly as for training, without augmentation: (3, S, S), for
    /// prediction.
    pub fn load_one(path: &Path, cfg: &ClipConfig) -> Result<Tensor> {
        let s = cfg.image.image_size;
        let rgb = prepare(path, s as u32, cfg.data.center_crop)
            .map_err(|e| anyhow::anyhow!("{}: cannot decode image: {e:#}", path.display()))?;
        let mut out = vec![0f32; 3 * s * s];
        normalise_into(rgb.as_raw(), s, &mut out);
        Ok(Tensor::from_vec(out, (3, s, s), &Device::Cpu)?)
    }
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let decoded = self.decoded.iter().filter(|&&d| d).count();
        f.debug_struct("ImageStore")
            .field("size", &self.size)
            .field("images", &self.len())
            .field("decoded", &decoded)
            .finish()
    }
}

/// One bad row per image that failed, at the first line that used it (captions files) or at the
/// image itself (class folders).
fn bad_rows(ds: &Dataset, errors: &[Option<String>]) -> Vec<BadRow> {
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
                Source::ClassFolders { .. } => BadRow::new(&img.path, 0, format!("cannot decode image: {e}")),
            })
        })
        .collect();
    bad.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    bad
}
