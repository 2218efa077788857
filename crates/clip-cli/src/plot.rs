//! Small PNG plots with no font or plotting dependency: the loss curve and similarity heat maps.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Line plot of several series (e.g. train and validation loss per epoch), each in its colour.
/// Axes from 0 to the largest value; a light grid at each quarter.
pub fn line_plot(path: &Path, series: &[(&[f64], [u8; 3])]) -> Result<()> {
    let (w, h, m) = (640u32, 400u32, 40u32);
    let mut img = RgbImage::from_pixel(w, h, BG);
    let n = series.iter().map(|(s, _)| s.len()).max().unwrap_or(0).max(2);
    let ymax = series
        .iter()
        .flat_map(|(s, _)| s.iter())
        .cloned()
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max)
        * 1.05;
    for q in 0..=4 {
        let y = h - m - (h - 2 * m) * q / 4;
        for x in m..w - m {
            img.put_pixel(x, y, GRID);
        }
    }
    for x in m..w - m {
        img.put_pixel(x, h - m, AXIS);
    }
    for y in m..=h - m {
        img.put_pixel(m, y, AXIS);
    }
    let px = |i: usize, v: f64| -> (f64, f64) {
        let x = m as f64 + (w - 2 * m) as f64 * i as f64 / (n - 1) as f64;
        let y = (h - m) as f64 - (h - 2 * m) as f64 * (v / ymax).clamp(0.0, 1.0);
        (x, y)
    };
    for (s, colour) in series {
        for i in 1..s.len() {
            if s[i - 1].is_finite() && s[i].is_finite() {
                let (a, b) = (px(i - 1, s[i - 1]), px(i, s[i]));
                line(&mut img, a, b, Rgb(*colour));
            }
        }
        for (i, v) in s.iter().enumerate() {
            if v.is_finite() {
                let (x, y) = px(i, *v);
                dot(&mut img, x, y, Rgb(*colour));
            }
        }
    }
    save(&img, path)
}

/// Heat map of a matrix (rows × cols), values mapped from [lo, hi] to a blue–white–red scale, one
/// square cell per entry; the diagonal (matching pairs) is outlined.
pub fn heat_map(path: &Path, m: &[Vec<f32>], lo: f32, hi: f32) -> Result<()> {
    let rows = m.len().max(1);
    let cols = m.first().map(|r| r.len()).unwrap_or(1).max(1);
    let cell = (480 / rows.max(cols)).clamp(4, 48) as u32;
    let (w, h) = (cols as u32 * cell + 2, rows as u32 * cell + 2);
    let mut img = RgbImage::from_pixel(w, h, BG);
    for (i, row) in m.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let t = ((v - lo) / (hi - lo).max(1e-9)).clamp(0.0, 1.0);
            let c = colour_scale(t);
            for dy in 0..cell {
                for dx in 0..cell {
                    let on_edge = i == j && (dy == 0 || dx == 0 || dy == cell - 1 || dx == cell - 1);
                    img.put_pixel(
                        1 + j as u32 * cell + dx,
                        1 + i as u32 * cell + dy,
                        if on_edge { Rgb([0, 0, 0]) } else { c },
                    );
                }
            }
        }
    }
    save(&img, path)
}

fn colour_scale(t: f32) -> Rgb<u8> {
    // 0 → blue, 0.5 → white, 1 → red.
    let (r, g, b) = if t < 0.5 {
        let s = t / 0.5;
        (s, s, 1.0)
    } else {
        let s = (1.0 - t) / 0.5;
        (1.0, s, s)
    };
    Rgb([(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8])
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn dot(img: &mut RgbImage, x: f64, y: f64, c: Rgb<u8>) {
    for dy in -2i64..=2 {
        for dx in -2i64..=2 {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    clip_core::checkpoint::write_atomic(path, bytes.get_ref())
}
