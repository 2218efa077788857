//! Image preprocessing: decode → RGB → model size (u8), then normalise (f32, CHW), optionally
//! through a random resized crop and a horizontal flip.
//!
//! The first half runs once per image at load ([`super::ImageStore`]); normalising runs once per
//! image per batch on the small stored image, so it costs microseconds. Augmentation instead
//! crops the original file, decoded again each time ([`augment_original`]).

use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use rand::{Rng, SeedableRng};

/// ImageNet statistics, as the tutorial's `A.Normalize()` and every torchvision ResNet use.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// File extensions taken as images in class folders (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

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
    let lo = (0..3)
        .map(|c| -IMAGENET_MEAN[c] / IMAGENET_STD[c])
        .fold(f32::INFINITY, f32::min);
    let hi = (0..3)
        .map(|c| (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        .fold(f32::NEG_INFINITY, f32::max);
    (lo, hi)
}

/// Decodes a file (format from its content, not its name) and applies its EXIF orientation, so a
/// phone photo is upright.
pub(crate) fn decode(path: &Path) -> Result<DynamicImage> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = ImageReader::new(BufReader::new(file))
        .with_guessed_format()?
        .into_decoder()?;
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
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

/// To `size`×`size`: a plain resize as the tutorial (aspect ratio not kept), or with `center_crop`
/// the centred square of the shorter side, resized (the same as shorter-side resize + centre crop).
pub(crate) fn fit(rgb: &RgbImage, size: u32, center_crop: bool) -> RgbImage {
    let (w, h) = rgb.dimensions();
    if center_crop && w != h {
        let side = w.min(h);
        let square = image::imageops::crop_imm(rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
        return fit(&square, size, false);
    }
    if (w, h) == (size, size) {
        return rgb.clone();
    }
    image::imageops::resize(rgb, size, size, FilterType::Triangle)
}

/// Decodes a file into the store's layout: `size`×`size` 8-bit RGB.
pub(crate) fn prepare(path: &Path, size: u32, center_crop: bool) -> Result<RgbImage> {
    Ok(fit(&to_rgb(decode(path)?), size, center_crop))
}

/// HWC u8 → CHW f32, normalised. `out` holds 3·S·S values.
pub(crate) fn normalise_into(rgb: &[u8], size: usize, out: &mut [f32]) {
    let plane = size * size;
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
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
pub(crate) fn augment_original(rgb: &RgbImage, size: usize, seed: u64, out: &mut [f32]) {
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
    let mut small = fit(&crop, size as u32, false);
    if flip {
        image::imageops::flip_horizontal_in_place(&mut small);
    }
    normalise_into(small.as_raw(), size, out);
}
