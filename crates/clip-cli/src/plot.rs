//! Labelled plots: line charts (loss, learning rate, recall per epoch) and heat maps (similarity
//! and confusion matrices), as PNG files and, for `report.html`, as SVG text.
//!
//! Drawn with `plotters`; text uses an embedded subset of DejaVu Sans (`assets/fonts`), so a plot
//! looks the same on every machine and no system font is looked up. The font has no Chinese,
//! Japanese or Korean glyphs: a label it cannot draw is shown by its index only ([`drawable`]),
//! and the full text goes into the run's `report.html`, which the browser draws.

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef};
use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

mod heat;

pub use heat::{css_colour, heat_map, HeatMap};

/// The embedded font: DejaVu Sans cut down to Latin, Greek and common symbols (38 KB).
static FONT_BYTES: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-subset.ttf");
/// The family name plotters knows the embedded font by.
const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters once; every drawing function calls it first.
fn font() -> Result<&'static FontRef<'static>> {
    static FONT: OnceLock<Result<FontRef<'static>, String>> = OnceLock::new();
    FONT.get_or_init(|| {
        register_font(FAMILY, FontStyle::Normal, FONT_BYTES).map_err(|_| "invalid embedded font".to_string())?;
        FontRef::try_from_slice(FONT_BYTES).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow!("the embedded plot font: {e}"))
}

/// Whether the embedded font has a glyph for every character of `s` (no CJK, no emoji).
pub fn drawable(s: &str) -> bool {
    match font() {
        Ok(f) => s.chars().all(|c| c.is_whitespace() || f.glyph_id(c).0 != 0),
        Err(_) => false,
    }
}

/// `s` cut to at most `max` characters, with "…" when cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// One line of a [`LinePlot`]: a value per epoch (epoch 1 first); non-finite values are gaps.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
    pub colour: [u8; 3],
    /// Line width in pixels: give overlapping series decreasing widths so each stays visible.
    pub width: u32,
}

/// A chart of values per epoch: title, axis labels, legend.
pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
    /// A logarithmic y axis (learning rates); non-positive values are left out.
    pub log_y: bool,
    /// Fixed y range (e.g. 0–1 for recall); otherwise from the data.
    pub y_range: Option<(f64, f64)>,
    /// The x value of each point (WiSE-FT's α); `None`: epochs 1, 2, …
    pub x: Option<&'a [f64]>,
}

/// Colours of matplotlib's default cycle, which people know from their own plots.
pub const BLUE: [u8; 3] = [31, 119, 180];
pub const ORANGE: [u8; 3] = [255, 127, 14];
pub const GREEN: [u8; 3] = [44, 160, 44];
pub const RED: [u8; 3] = [214, 39, 40];
pub const PURPLE: [u8; 3] = [148, 103, 189];

/// Size of the line plots, in pixels.
pub const LINE_SIZE: (u32, u32) = (720, 440);

/// Writes a line plot as a PNG file.
pub fn line_plot(path: &Path, plot: &LinePlot) -> Result<()> {
    let (w, h) = LINE_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_lines(&root, plot).with_context(|| format!("drawing {}", path.display()))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    save_png(path, w, h, buf)
}

/// A line plot as SVG text (for report.html).
pub fn line_plot_svg(plot: &LinePlot) -> Result<String> {
    let (w, h) = LINE_SIZE;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
        draw_lines(&root, plot)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(s)
}

impl LinePlot<'_> {
    /// Whether a value is drawn: finite, and positive on a logarithmic axis.
    fn keeps(&self, v: f64) -> bool {
        v.is_finite() && (!self.log_y || v > 0.0)
    }

    /// The longest series' number of points.
    fn points(&self) -> usize {
        self.series.iter().map(|s| s.values.len()).max().unwrap_or(0)
    }

    /// The x coordinate of point `i`: its given x, else epoch i + 1.
    fn x_at(&self, i: usize) -> f64 {
        self.x.and_then(|xs| xs.get(i).copied()).unwrap_or((i + 1) as f64)
    }

    /// The y axis's range: the fixed one, else the data's with a margin (from 0 for values ≥ 0).
    fn y_bounds(&self) -> (f64, f64) {
        if let Some(r) = self.y_range {
            return r;
        }
        let values = || {
            self.series
                .iter()
                .flat_map(|s| s.values.iter().copied())
                .filter(|&v| self.keeps(v))
        };
        let lo = values().fold(f64::INFINITY, f64::min);
        let hi = values().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            (0.0, 1.0)
        } else if self.log_y {
            (lo / 1.5, hi * 1.5)
        } else {
            let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.05).max(1e-6);
            ((lo - pad).min(if lo >= 0.0 { 0.0 } else { lo - pad }), hi + pad)
        }
    }

    /// The x axis's range: the given x values with a margin, else epochs 1 to n.
    fn x_bounds(&self) -> (f64, f64) {
        match self.x {
            Some(xs) if !xs.is_empty() => {
                let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let pad = ((hi - lo) * 0.05).max(0.02);
                (lo - pad, hi + pad)
            }
            _ => (0.8, (self.points() as f64).max(2.0) + 0.2),
        }
    }

    /// The legend goes in the corner the curves leave free at the end: lower right when they end
    /// high (recall rising to 1), upper right when they end low (a falling loss).
    fn legend_corner(&self, lo: f64, hi: f64) -> SeriesLabelPosition {
        let ends: Vec<f64> = self
            .series
            .iter()
            .filter_map(|s| s.values.iter().rev().copied().find(|&v| self.keeps(v)))
            .collect();
        let high = |v: f64| {
            if self.log_y {
                v.ln() > (lo.ln() + hi.ln()) / 2.0
            } else {
                v > (lo + hi) / 2.0
            }
        };
        if !ends.is_empty() && ends.iter().all(|&v| high(v)) {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        }
    }
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, plot: &LinePlot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    font()?;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let (lo, hi) = plot.y_bounds();
    let (x_min, x_max) = plot.x_bounds();
    let mut b = ChartBuilder::on(root);
    b.caption(plot.title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(if plot.log_y { 78 } else { 64 });
    // Both branches draw the same series; only the y coordinate type differs.
    if plot.log_y {
        let chart = b.build_cartesian_2d(x_min..x_max, (lo..hi).log_scale()).map_err(err)?;
        // Label 1, 2 and 5 × 10^k only: every minor tick labelled is unreadable.
        let wide = hi / lo > 30.0;
        finish_lines(chart, plot, (lo, hi), &move |v: &f64| {
            let m = v / 10f64.powf(v.log10().floor());
            if !wide {
                format!("{v:.1e}")
            } else if [1.0, 2.0, 5.0].iter().any(|k| (m - k).abs() < 0.02) {
                format!("{v:.0e}")
            } else {
                String::new()
            }
        })
    } else {
        let chart = b.build_cartesian_2d(x_min..x_max, lo..hi).map_err(err)?;
        let span = hi - lo;
        let tiny = hi.abs().max(lo.abs()) < 0.01;
        finish_lines(chart, plot, (lo, hi), &move |v: &f64| {
            if tiny {
                if *v == 0.0 {
                    "0".to_string()
                } else {
                    format!("{v:.1e}")
                }
            } else if span < 0.05 {
                format!("{v:.4}")
            } else if span < 2.0 {
                format!("{v:.2}")
            } else {
                format!("{v:.1}")
            }
        })
    }
}

/// Draws a line chart's mesh (y labels by `y_format`), its series with their points, and the
/// legend, on either y axis (linear or logarithmic) between `lo` and `hi`.
fn finish_lines<'a, DB, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    plot: &LinePlot,
    (lo, hi): (f64, f64),
    y_format: &dyn Fn(&f64) -> String,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .x_labels(plot.points().clamp(2, 10))
        .x_label_formatter(&|x| {
            if plot.x.is_some() {
                format!("{x:.1}")
            } else {
                format!("{}", x.round() as i64)
            }
        })
        .y_label_formatter(y_format)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 15))
        .light_line_style(RGBColor(242, 242, 242))
        .draw()
        .map_err(err)?;
    for s in &plot.series {
        let c = RGBColor(s.colour[0], s.colour[1], s.colour[2]);
        let pts: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| plot.keeps(**v))
            .map(|(i, v)| (plot.x_at(i), *v))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(s.width)))
            .map_err(err)?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        let r = s.width / 2 + if pts.len() > 25 { 1 } else { 2 };
        if pts.len() <= 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, r, c.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(plot.legend_corner(lo, hi))
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn save_png(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer of the wrong size")?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    // In a run folder the plot is covered by its checksum manifest, like every file of a run.
    clip_core::files::write_covered(path, bytes.get_ref())
}

/// The curves of a run's history, one value per epoch, ready to plot as PNG or SVG.
pub struct Curves {
    train_loss: Vec<f64>,
    val_loss: Vec<f64>,
    /// (name, values) of each parameter group that trains.
    lr: Vec<(&'static str, Vec<f64>)>,
    /// (name, values): recall@1 both ways, or zero-shot accuracy for class folders.
    quality: Vec<(&'static str, Vec<f64>)>,
    zero_shot: bool,
    /// The checkpoint's validation loss, repeated per epoch (a fine-tune).
    start_loss: Option<Vec<f64>>,
}

impl Curves {
    /// From stage 4's history; frozen towers' learning rates are left out (they do not train).
    pub fn new(history: &[clip_core::fit::EpochRecord], freeze_image: bool, freeze_text: bool) -> Self {
        let col = |f: fn(&clip_core::fit::EpochRecord) -> f64| history.iter().map(f).collect::<Vec<f64>>();
        let mut lr = vec![("heads", col(|r| r.lr_head))];
        if !freeze_image {
            lr.push(("image tower", col(|r| r.lr_image)));
        }
        if !freeze_text {
            lr.push(("text tower", col(|r| r.lr_text)));
        }
        let zero_shot = history.iter().any(|r| r.zero_shot.is_some());
        let quality = if zero_shot {
            vec![("zero-shot accuracy", col(|r| r.zero_shot.unwrap_or(f64::NAN)))]
        } else {
            vec![
                ("image → text", col(|r| r.recall.i2t_r1)),
                ("text → image", col(|r| r.recall.t2i_r1)),
            ]
        };
        Self {
            train_loss: col(|r| r.train_loss),
            val_loss: col(|r| r.val_loss),
            lr,
            quality,
            zero_shot,
            start_loss: None,
        }
    }

    /// Adds the untouched checkpoint's validation figures (a fine-tune's start) as flat lines
    /// beside every epoch's.
    pub fn with_start(mut self, start: Option<&clip_core::fit::Validation>) -> Self {
        let Some(v) = start else { return self };
        let n = self.val_loss.len();
        if self.zero_shot {
            self.quality
                .push(("start: zero-shot accuracy", vec![v.zero_shot.unwrap_or(f64::NAN); n]));
        } else {
            self.quality.push(("start: image → text", vec![v.recall.i2t_r1; n]));
            self.quality.push(("start: text → image", vec![v.recall.t2i_r1; n]));
        }
        self.start_loss = Some(vec![v.loss; n]);
        self
    }

    pub fn loss(&self) -> LinePlot<'_> {
        LinePlot {
            title: "Loss per epoch",
            x_label: "epoch",
            y_label: "contrastive loss",
            series: vec![
                Series {
                    name: "train",
                    values: &self.train_loss,
                    colour: BLUE,
                    width: 2,
                },
                Series {
                    name: "validation",
                    values: &self.val_loss,
                    colour: ORANGE,
                    width: 2,
                },
            ]
            .into_iter()
            .chain(self.start_loss.as_ref().map(|v| Series {
                name: "start: validation",
                values: v,
                colour: GREEN,
                width: 2,
            }))
            .collect(),
            log_y: false,
            y_range: None,
            x: None,
        }
    }

    pub fn lr(&self) -> LinePlot<'_> {
        // A log axis only when the rates span more than a factor of 20 (a cosine schedule's tail,
        // towers and heads far apart); a few plateau steps read better on a linear one.
        let positive = || self.lr.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| *v > 0.0);
        let (lo, hi) = (positive().fold(f64::INFINITY, f64::min), positive().fold(0.0, f64::max));
        let log_y = lo.is_finite() && hi / lo > 20.0;
        LinePlot {
            title: "Learning rate per epoch",
            x_label: "epoch",
            y_label: if log_y {
                "learning rate (log scale)"
            } else {
                "learning rate"
            },
            series: self
                .lr
                .iter()
                .zip([(GREEN, 6), (PURPLE, 4), (RED, 2)])
                .map(|((name, v), (colour, width))| Series {
                    name,
                    values: v,
                    colour,
                    width,
                })
                .collect(),
            log_y,
            y_range: None,
            x: None,
        }
    }

    pub fn quality(&self) -> LinePlot<'_> {
        LinePlot {
            title: if self.zero_shot {
                "Validation zero-shot accuracy per epoch"
            } else {
                "Validation recall@1 per epoch"
            },
            x_label: "epoch",
            y_label: if self.zero_shot { "accuracy" } else { "recall@1" },
            series: self
                .quality
                .iter()
                .zip([(BLUE, 4), (ORANGE, 2), (GREEN, 2), (RED, 2)])
                .map(|((name, v), (colour, width))| Series {
                    name,
                    values: v,
                    colour,
                    width,
                })
                .collect(),
            log_y: false,
            y_range: Some((0.0, 1.05)),
            x: None,
        }
    }

    /// Writes loss.png, lr.png and quality.png into `dir`.
    pub fn write_png(&self, dir: &Path) -> Result<()> {
        line_plot(&dir.join("loss.png"), &self.loss())?;
        line_plot(&dir.join("lr.png"), &self.lr())?;
        line_plot(&dir.join("quality.png"), &self.quality())
    }
}

/// WiSE-FT's curve: validation quality and loss against α (0: the checkpoint, 1: fine-tuned).
pub struct WiseCurve {
    alphas: Vec<f64>,
    quality: Vec<f64>,
    zero_shot: bool,
}

/// The curve of a WiSE-FT sweep.
pub fn wise_ft(w: &clip_core::fit::WiseFt) -> WiseCurve {
    WiseCurve {
        alphas: w.points.iter().map(|p| p.alpha).collect(),
        quality: w.points.iter().map(|p| p.validation.quality()).collect(),
        zero_shot: w.points.iter().any(|p| p.validation.zero_shot.is_some()),
    }
}

impl WiseCurve {
    pub fn plot(&self) -> LinePlot<'_> {
        LinePlot {
            title: "WiSE-FT: (1 − α)·checkpoint + α·fine-tuned",
            x_label: "α (0 = checkpoint, 1 = fine-tuned)",
            y_label: if self.zero_shot {
                "validation zero-shot accuracy"
            } else {
                "validation mean recall@1"
            },
            series: vec![Series {
                name: if self.zero_shot {
                    "zero-shot accuracy"
                } else {
                    "mean recall@1"
                },
                values: &self.quality,
                colour: BLUE,
                width: 3,
            }],
            log_y: false,
            y_range: Some((0.0, 1.05)),
            x: Some(&self.alphas),
        }
    }

    pub fn write_png(&self, path: &Path) -> Result<()> {
        line_plot(path, &self.plot())
    }
}

/// `s` with every character the embedded font cannot draw replaced by "?" (file names in plots).
pub fn printable(s: &str) -> String {
    match font() {
        Ok(f) => s
            .chars()
            .map(|c| {
                if c.is_whitespace() || f.glyph_id(c).0 != 0 {
                    c
                } else {
                    '?'
                }
            })
            .collect(),
        Err(_) => s.chars().map(|c| if c.is_ascii() { c } else { '?' }).collect(),
    }
}

/// One picture of a [`contact_sheet`] with the lines of text under it.
pub struct Tile {
    pub image: Option<image::RgbImage>,
    pub lines: Vec<String>,
}

/// Side of a contact sheet's thumbnails, in pixels.
pub const TILE: u32 = 160;

/// A grid of thumbnails (3 per row) with a title and each tile's lines of text under it (e.g.
/// "#1  0.613" and the file name); a missing image is drawn as a grey box.
pub fn contact_sheet(path: &Path, title: &str, tiles: &[Tile]) -> Result<()> {
    font()?;
    let cols = 3u32.min(tiles.len().max(1) as u32);
    let rows = (tiles.len() as u32).div_ceil(cols).max(1);
    let text_h = 18 * tiles.iter().map(|t| t.lines.len()).max().unwrap_or(0) as u32 + 6;
    let (cw, ch) = (TILE + 16, TILE + 8 + text_h);
    let top = 36u32;
    let (w, h) = ((cols * cw).max(360), top + rows * ch);
    let mut sheet = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (k, t) in tiles.iter().enumerate() {
        let (cx, cy) = ((k as u32 % cols) * cw + 8, top + (k as u32 / cols) * ch + 4);
        match &t.image {
            Some(img) => {
                let thumb = image::imageops::thumbnail(img, TILE, TILE);
                let (dx, dy) = ((TILE - thumb.width()) / 2, (TILE - thumb.height()) / 2);
                image::imageops::overlay(&mut sheet, &thumb, (cx + dx) as i64, (cy + dy) as i64);
            }
            None => {
                for y in 0..TILE {
                    for x in 0..TILE {
                        sheet.put_pixel(cx + x, cy + y, image::Rgb([220, 220, 220]));
                    }
                }
            }
        }
    }
    let mut buf = sheet.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
        root.draw(&Text::new(
            printable(title),
            (8, 8),
            (FAMILY, 18).into_font().color(&BLACK),
        ))
        .map_err(err)?;
        for (k, t) in tiles.iter().enumerate() {
            let (cx, cy) = ((k as u32 % cols) * cw + 8, top + (k as u32 / cols) * ch + 4);
            for (l, line) in t.lines.iter().enumerate() {
                root.draw(&Text::new(
                    shorten(&printable(line), 24),
                    (cx as i32, (cy + TILE + 4 + 18 * l as u32) as i32),
                    (FAMILY, 14).into_font().color(&BLACK),
                ))
                .map_err(err)?;
            }
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    save_png(path, w, h, buf)
}
