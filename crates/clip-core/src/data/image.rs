//! Image preprocessing: decode → RGB → model size (u8), then normalise (f32, CHW), optionally
//! through a random resized crop and a horizontal flip.
//!
//! The first half runs once per image at load ([`super::ImageStore`]); normalising runs once per
//! image per batch on the small stored image, so it costs microseconds. Augmentation instead
//! crops the original file, decoded again each time ([`augment_original`]).

use std::io::{BufRead, BufReader, Seek};
use std::path::Path;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use rand::{Rng, SeedableRng};

use crate::config::{ClipConfig, Interpolation};

/// ImageNet statistics, as the tutorial's `A.Normalize()` and every torchvision ResNet use
/// (the default of `image.mean` / `image.std`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// File extensions taken as images in class folders (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The widest and tallest image decoded (a 16K panorama fits), and the most memory one decode
/// may take: 256 MiB holds an 89-megapixel RGB photo. A file's header alone sets what a decoder
/// allocates, so a few hundred bytes declaring 65535×65535 pixels would otherwise ask for 12.9 GB
/// (per thread, as images are decoded in parallel); checked against the header, before any pixel
/// is allocated, such a file is refused in microseconds.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Random resized crop: share of the image's area kept, and the aspect ratio range (torchvision's).
const CROP_SCALE: (f32, f32) = (0.6, 1.0);
const CROP_RATIO: (f32, f32) = (3.0 / 4.0, 4.0 / 3.0);

pub(crate) fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The smallest and largest value a normalised pixel can take (black in the channel with the
/// largest mean/std ratio, white in the one with the smallest): about [-2.118, 2.640].
pub fn normalised_range() -> (f32, f32) {
    Preprocess::default().normalised_range()
}

/// How a decoded image becomes the model's input: the size, the centre crop, the resampling
/// filter and the per-channel normalisation. From-scratch towers use the tutorial's (ImageNet
/// statistics, plain bilinear resize); a pretrained timm tower uses its own `pretrained_cfg`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub size: usize,
    pub center_crop: bool,
    /// Share of the shorter side the centre crop keeps (timm's `crop_pct`).
    pub crop_pct: f32,
    /// Resize the shorter side to this first, then crop the centre (see `ImageConfig::resize`).
    pub resize: Option<u32>,
    pub filter: FilterType,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Preprocess {
    fn default() -> Self {
        Self::from_config(&ClipConfig::default())
    }
}

impl Preprocess {
    pub fn from_config(cfg: &ClipConfig) -> Self {
        let i = &cfg.image;
        Self {
            size: i.image_size,
            center_crop: cfg.data.center_crop,
            crop_pct: i.crop_pct as f32,
            resize: i.resize.and_then(|r| u32::try_from(r).ok()),
            filter: match i.interpolation {
                Interpolation::Nearest => FilterType::Nearest,
                Interpolation::Bilinear => FilterType::Triangle,
                Interpolation::Bicubic => FilterType::CatmullRom,
            },
            mean: i.mean.map(|v| v as f32),
            std: i.std.map(|v| v as f32),
        }
    }

    /// What the stored (not yet normalised) pixels depend on besides the size, for naming caches.
    pub fn cache_variant(&self) -> String {
        let crop = if let (true, Some(edge)) = (self.center_crop, self.resize) {
            format!("edge{edge}-crop")
        } else if self.center_crop {
            format!("crop{:.3}", self.crop_pct)
        } else {
            "resize".to_string()
        };
        format!("{crop}-{:?}", self.filter).to_lowercase()
    }

    /// The smallest and largest value a normalised pixel can take.
    pub fn normalised_range(&self) -> (f32, f32) {
        let lo = (0..3)
            .map(|c| -self.mean[c] / self.std[c])
            .fold(f32::INFINITY, f32::min);
        let hi = (0..3)
            .map(|c| (1.0 - self.mean[c]) / self.std[c])
            .fold(f32::NEG_INFINITY, f32::max);
        (lo, hi)
    }
}

/// Decodes a file (format from its content, not its name) and applies its EXIF orientation, so a
/// phone photo is upright.
///
/// Sizes are checked against [`MAX_IMAGE_SIDE`] and [`MAX_DECODE_BYTES`] from the header, before
/// anything is allocated: `into_decoder` + `from_decoder` (needed for the orientation) skip the
/// allocation check `ImageReader::decode` makes, so it is made here.
pub(crate) fn decode(path: &Path) -> Result<DynamicImage> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    decode_reader(BufReader::new(file))
}

/// [`decode`] for bytes from anywhere (a tar member, an upload), under the same limits.
pub(crate) fn decode_reader(reader: impl BufRead + Seek) -> Result<DynamicImage> {
    let mut reader = ImageReader::new(reader).with_guessed_format()?;
    reader.limits(limits());
    let mut decoder = reader.into_decoder().map_err(too_large)?;
    let (w, h) = decoder.dimensions();
    let bytes = decoder.total_bytes();
    if bytes > MAX_DECODE_BYTES {
        anyhow::bail!(
            "image too large: {w}×{h} pixels would take {} MiB to decode, more than the {} MiB allowed",
            bytes >> 20,
            MAX_DECODE_BYTES >> 20
        );
    }
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// A limit error in words a user can act on (the decoder's own says only "limits exceeded").
fn too_large(e: image::ImageError) -> anyhow::Error {
    match e {
        image::ImageError::Limits(l) => anyhow::anyhow!(
            "image too large: {l} (at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels and {} MiB decoded)",
            MAX_DECODE_BYTES >> 20
        ),
        e => e.into(),
    }
}

/// Any layout (grey, 1-bit, 16-bit, with alpha) → 8-bit RGB. Transparent pixels are laid on
/// white: their colour is undefined and is often black, which would hide a dark subject.
pub(crate) fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = RgbImage::new(w, h);
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

/// The longest photo, in multiples of its shorter side, resized whole before its centre crop.
const MAX_ASPECT: u32 = 4;

/// To `size`×`size`: a plain resize as the tutorial (aspect ratio not kept), or with `center_crop`
/// the centred square of `crop_pct` of the shorter side, resized (close to timm's evaluation
/// transform: shorter side to size / crop_pct, then a centre crop), or with `resize` exactly
/// that order: the shorter side resized, then the centre cropped (transformers' processor).
pub(crate) fn fit(rgb: &RgbImage, p: &Preprocess) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let size = p.size as u32;
    if let (true, Some(edge)) = (p.center_crop, p.resize) {
        // A photo longer than MAX_ASPECT × its shorter side keeps only its centre that long
        // first: resizing a 16384×1 strip whole would take gigabytes for a crop of a few pixels
        // (any real photo is unchanged, and the crop below would drop the rest anyway).
        if w.max(h) / w.min(h).max(1) > MAX_ASPECT {
            let short = w.min(h).max(1);
            let long = short.saturating_mul(MAX_ASPECT);
            let (cw, ch) = if w > h { (long, h) } else { (w, long) };
            let centre = image::imageops::crop_imm(rgb, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
            return fit(&centre, p);
        }
        // transformers' CLIPImageProcessor: the shorter side to `edge`, the longer to
        // int(edge · long / short), then the centre `size` square (offsets rounded down).
        let scale = |long: u32, short: u32| (edge as u64 * long as u64 / short.max(1) as u64) as u32;
        let (rw, rh) = if w <= h {
            (edge, scale(h, w))
        } else {
            (scale(w, h), edge)
        };
        if rw >= size && rh >= size {
            let resized = if (rw, rh) == (w, h) {
                rgb.clone()
            } else {
                image::imageops::resize(rgb, rw, rh, p.filter)
            };
            return image::imageops::crop_imm(&resized, (rw - size) / 2, (rh - size) / 2, size, size).to_image();
        }
    }
    if p.center_crop && (w != h || p.crop_pct < 1.0) {
        let side = ((w.min(h) as f32 * p.crop_pct).round() as u32).clamp(1, w.min(h));
        let square = image::imageops::crop_imm(rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
        return fit(
            &square,
            &Preprocess {
                center_crop: false,
                ..*p
            },
        );
    }
    if (w, h) == (size, size) {
        return rgb.clone();
    }
    image::imageops::resize(rgb, size, size, p.filter)
}

/// Decodes a file into the store's layout: `size`×`size` 8-bit RGB.
pub(crate) fn prepare(path: &Path, p: &Preprocess) -> Result<RgbImage> {
    Ok(fit(&to_rgb(decode(path)?), p))
}

/// HWC u8 → CHW f32, normalised. `out` holds 3·S·S values.
pub(crate) fn normalise_into(rgb: &[u8], p: &Preprocess, out: &mut [f32]) {
    let plane = p.size * p.size;
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - p.mean[c]) / p.std[c];
        }
    }
}

/// A random resized crop of the original, full-resolution image (area share in [`CROP_SCALE`],
/// aspect ratio in [`CROP_RATIO`], torchvision's `RandomResizedCrop`), resized to S×S, flipped
/// left–right half the time, then normalised. The same seed gives the same result.
///
/// Cropping the original rather than the stored S×S copy keeps the detail a zoomed-in crop
/// should have (a 60 % crop of a 224 px copy is a blurry upscale of 173 px), at the price of
/// decoding the file again for every image of every epoch: the streaming path's cost.
pub(crate) fn augment_original(rgb: &RgbImage, p: &Preprocess, seed: u64, out: &mut [f32]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (w, h) = rgb.dimensions();
    let (fw, fh) = (w as f32, h as f32);
    let (mut crop_w, mut crop_h, mut x, mut y) = (w, h, 0, 0);
    // torchvision's retry loop: a crop at an extreme ratio may not fit; after 10 tries, keep it all.
    for _ in 0..10 {
        let area = fw * fh * rng.random_range(CROP_SCALE.0..=CROP_SCALE.1);
        let ratio = rng.random_range(CROP_RATIO.0.ln()..=CROP_RATIO.1.ln()).exp();
        let (cw, ch) = (
            (area * ratio).sqrt().round() as u32,
            (area / ratio).sqrt().round() as u32,
        );
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            (crop_w, crop_h) = (cw, ch);
            x = rng.random_range(0..=w - cw);
            y = rng.random_range(0..=h - ch);
            break;
        }
    }
    let flip = rng.random_bool(0.5);
    let crop = image::imageops::crop_imm(rgb, x, y, crop_w, crop_h).to_image();
    let mut small = fit(
        &crop,
        &Preprocess {
            center_crop: false,
            ..*p
        },
    );
    if flip {
        image::imageops::flip_horizontal_in_place(&mut small);
    }
    normalise_into(small.as_raw(), p, out);
}
