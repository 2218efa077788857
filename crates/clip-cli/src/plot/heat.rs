//! Heat maps (similarity and confusion matrices) as PNG files, and their colour scale, which
//! report.html's tables share.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{drawable, font, save_png, shorten, FAMILY};

/// A matrix drawn as coloured cells, with labelled rows and columns and a colour key.
pub struct HeatMap<'a> {
    pub title: &'a str,
    /// What the rows are (the y axis), e.g. "image".
    pub row_axis: &'a str,
    /// What the columns are (the x axis), e.g. "caption".
    pub col_axis: &'a str,
    /// A short name per row and per column, listed beside the matrix after its index where the
    /// font can draw it (see [`drawable`]); empty: indices only.
    pub row_names: &'a [String],
    pub col_names: &'a [String],
    /// Values mapped from `lo` (blue) through white to `hi` (red).
    pub lo: f32,
    pub hi: f32,
    /// What the colours mean, under the colour bar (e.g. "cosine similarity").
    pub value_label: &'a str,
    /// Where the names the font cannot draw can be read, e.g. "report.html".
    pub see_also: &'a str,
}

/// Writes a heat map as a PNG file: the matrix with index ticks on both axes, the diagonal
/// outlined, a colour bar, and a key beside it ("0: astronaut.jpg").
pub fn heat_map(path: &Path, m: &[Vec<f32>], spec: &HeatMap) -> Result<()> {
    font()?;
    let rows = m.len().max(1);
    let cols = m.first().map(|r| r.len()).unwrap_or(1).max(1);
    let key = key_lines(spec);
    let (mw, mh) = (560u32, 560u32);
    let key_w = if key.is_empty() { 0 } else { 380 };
    let w = mw + 110 + key_w;
    let h = mh.max(60 + 17 * key.len() as u32 + 20);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_heat(&root, m, rows, cols, spec, &key, mw).with_context(|| format!("drawing {}", path.display()))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    save_png(path, w, h, buf)
}

/// The key beside a heat map: one line per labelled row and column.
fn key_lines(spec: &HeatMap) -> Vec<String> {
    let mut lines = vec![];
    let mut hidden = 0;
    let same = spec.row_names == spec.col_names;
    let both = format!("rows ({}) and columns ({})", spec.row_axis, spec.col_axis);
    let rows = if same { both.as_str() } else { spec.row_axis };
    for (axis, names) in [
        (rows, spec.row_names),
        (spec.col_axis, if same { &[][..] } else { spec.col_names }),
    ] {
        if names.is_empty() {
            continue;
        }
        if !lines.is_empty() {
            lines.push(String::new());
        }
        lines.push(if same {
            format!("{axis}:")
        } else {
            format!("{axis} (index: name):")
        });
        for (i, n) in names.iter().enumerate() {
            if drawable(n) {
                lines.push(format!("{i}: {}", shorten(n, 44)));
            } else {
                hidden += 1;
                lines.push(format!("{i}: (text in {})", spec.see_also));
            }
        }
    }
    if hidden > 0 {
        lines.push(String::new());
        lines.push(format!("{hidden} names use characters this font lacks;"));
        lines.push(format!("{} shows them all.", spec.see_also));
    }
    lines
}

fn draw_heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    m: &[Vec<f32>],
    rows: usize,
    cols: usize,
    spec: &HeatMap,
    key: &[String],
    mw: u32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let (matrix, rest) = root.split_horizontally(mw);
    let (bar, key_area) = rest.split_horizontally(110);
    draw_matrix(&matrix, m, rows, cols, spec)?;
    draw_colour_bar(&bar, spec, root.dim_in_pixel().1)?;
    for (k, line) in key.iter().enumerate() {
        key_area
            .draw(&Text::new(
                line.clone(),
                (10, 50 + 17 * k as i32),
                (FAMILY, 13).into_font().color(&BLACK),
            ))
            .map_err(err)?;
    }
    Ok(())
}

/// The heat map's cells, with index ticks, the values where the cells hold them, and the
/// diagonal outlined.
fn draw_matrix<DB: DrawingBackend>(
    matrix: &DrawingArea<DB, Shift>,
    m: &[Vec<f32>],
    rows: usize,
    cols: usize,
    spec: &HeatMap,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let mut chart = ChartBuilder::on(matrix)
        .caption(spec.title, (FAMILY, 20))
        .margin(10)
        .x_label_area_size(46)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..cols as f64 - 0.5, rows as f64 - 0.5..-0.5f64)
        .map_err(err)?;
    let tick = |n: usize| (n.div_ceil(16)).max(1);
    let (xt, yt) = (tick(cols), tick(rows));
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(format!("{} (index)", spec.col_axis))
        .y_desc(format!("{} (index)", spec.row_axis))
        .x_labels(cols.min(16))
        .y_labels(rows.min(16))
        .x_label_formatter(&|x| label_at(*x, cols, xt))
        .y_label_formatter(&|y| label_at(*y, rows, yt))
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 14))
        .draw()
        .map_err(err)?;
    let scale = |v: f32| heat_colour(v, spec.lo, spec.hi);
    chart
        .draw_series(m.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, v)| {
                let (x, y) = (j as f64, i as f64);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], scale(*v).filled())
            })
        }))
        .map_err(err)?;
    // The values themselves, where the cells are big enough to hold them.
    let (pw, ph) = chart.plotting_area().dim_in_pixel();
    if pw as usize / cols >= 30 && ph as usize / rows >= 18 {
        let style = (FAMILY, 11)
            .into_font()
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
        chart
            .draw_series(m.iter().enumerate().flat_map(|(i, row)| {
                let style = style.clone();
                row.iter()
                    .enumerate()
                    .map(move |(j, v)| Text::new(format!("{v:.2}"), (j as f64, i as f64), style.clone()))
            }))
            .map_err(err)?;
    }
    chart
        .draw_series((0..rows.min(cols)).map(|i| {
            Rectangle::new(
                [(i as f64 - 0.5, i as f64 - 0.5), (i as f64 + 0.5, i as f64 + 0.5)],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// Colour bar: the scale from lo to hi, with ticks, and what the colours mean under it (`h`: the
/// whole picture's height).
fn draw_colour_bar<DB: DrawingBackend>(bar: &DrawingArea<DB, Shift>, spec: &HeatMap, h: u32) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let scale = |v: f32| heat_colour(v, spec.lo, spec.hi);
    let mut cb = ChartBuilder::on(bar)
        .margin_top(50)
        .margin_bottom(56)
        .margin_left(8)
        .margin_right(8)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..1f64, spec.lo as f64..spec.hi as f64)
        .map_err(err)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FAMILY, 12))
        .draw()
        .map_err(err)?;
    let steps = 100;
    let span = (spec.hi - spec.lo) as f64;
    cb.draw_series((0..steps).map(|k| {
        let a = spec.lo as f64 + span * k as f64 / steps as f64;
        let b = spec.lo as f64 + span * (k + 1) as f64 / steps as f64;
        Rectangle::new([(0.0, a), (1.0, b)], scale(a as f32).filled())
    }))
    .map_err(err)?;
    bar.draw(&Text::new(
        spec.value_label.to_string(),
        (6, h as i32 - 40),
        (FAMILY, 12).into_font().color(&BLACK),
    ))
    .map_err(err)?;
    Ok(())
}

/// The tick label at coordinate `x` of an axis of `n` cells (cell i spans i ± 0.5): the index
/// of the cell it centres, every `every`-th one; nothing between cells.
fn label_at(x: f64, n: usize, every: usize) -> String {
    let i = x.round() as i64;
    if (x - i as f64).abs() > 1e-6 || i < 0 || i as usize >= n || !(i as usize).is_multiple_of(every) {
        String::new()
    } else {
        format!("{i}")
    }
}

/// 0 → blue, 0.5 → white, 1 → red.
fn colour_scale(t: f32) -> RGBColor {
    let (r, g, b) = if t < 0.5 {
        let s = t / 0.5;
        (s, s, 1.0)
    } else {
        let s = (1.0 - t) / 0.5;
        (1.0, s, s)
    };
    RGBColor((r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8)
}

/// The colour of `v` on a heat map from `lo` to `hi`: blue–white–red when the range spans
/// negative values (similarities), white–red when it starts at 0 or above (shares, counts).
fn heat_colour(v: f32, lo: f32, hi: f32) -> RGBColor {
    let t = ((v - lo) / (hi - lo).max(1e-9)).clamp(0.0, 1.0);
    colour_scale(if lo >= 0.0 { 0.5 + t / 2.0 } else { t })
}

/// The same scale as a CSS colour, for report.html.
pub fn css_colour(v: f32, lo: f32, hi: f32) -> String {
    let c = heat_colour(v, lo, hi);
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}
