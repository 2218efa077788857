//! `report.html`: one self-contained page per run folder that a person can open offline — the
//! config, the data, the curves (inline SVG), the similarity matrix before and after training with
//! thumbnails and captions, and each image's best captions and each caption's best images.
//!
//! Self-contained on purpose: the page loads nothing (no CDN, no web font, no script); thumbnails
//! are JPEG `data:` URIs, declared once each as a CSS class so an image shown in several places
//! costs its bytes once. The browser draws the captions, so Chinese, Japanese and Korean text
//! shows, unlike in the PNG plots.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;
use clip_core::data::Dataset;
use clip_core::embed::cosine_similarity;
use clip_core::fit::Trainer;
use clip_core::retrieval::{argsort_desc, to_rows};
use serde::{Deserialize, Serialize};

use crate::plot::{self, Curves};

/// The report's file name in a run folder.
pub const REPORT: &str = "report.html";
/// The fixed pairs' names, captions and similarity matrices (the heat maps' key).
pub const SIMILARITY: &str = "similarity.json";
/// At most this many images are ranked in the report (an evenly spaced sample of the dataset).
pub const MAX_IMAGES: usize = 24;
/// At most this many distinct captions are ranked.
pub const MAX_CAPTIONS: usize = 96;
/// Best captions listed per image, best images per caption.
const TOP: usize = 3;
/// Thumbnails are at most this many pixels wide and high.
const THUMB: u32 = 96;

/// The similarity matrix of the trainer's fixed pairs before and after training, with the names
/// and captions that label it. Saved as `similarity.json` so a resumed run still has "before".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fixed {
    /// Pair indices into the dataset ([`Trainer::fixed_pairs`]).
    pub pairs: Vec<usize>,
    /// Row labels: the pairs' image names.
    pub images: Vec<String>,
    /// Column labels: the pairs' captions.
    pub captions: Vec<String>,
    /// Image rows × caption columns, cosine similarity, before the first epoch.
    pub before: Option<Vec<Vec<f32>>>,
    /// The same after training (the best model).
    pub after: Option<Vec<Vec<f32>>>,
}

impl Fixed {
    /// The fixed pairs and their labels, with no matrix yet.
    pub fn new(t: &Trainer) -> Self {
        let ds = &t.data().dataset;
        let pairs = t.fixed_pairs();
        Self {
            images: pairs
                .iter()
                .map(|&p| ds.images[ds.pairs[p].image].name.clone())
                .collect(),
            captions: pairs.iter().map(|&p| ds.pairs[p].caption.clone()).collect(),
            pairs,
            before: None,
            after: None,
        }
    }

    /// The run's `similarity.json` when it holds the same pairs (a resumed run), else a new one.
    pub fn load_or_new(t: &Trainer) -> Self {
        let fresh = Self::new(t);
        std::fs::read_to_string(t.out().join(SIMILARITY))
            .ok()
            .and_then(|s| serde_json::from_str::<Fixed>(&s).ok())
            .filter(|f| f.pairs == fresh.pairs && f.captions == fresh.captions)
            .unwrap_or(fresh)
    }

    pub fn save(&self, run: &Path) -> Result<()> {
        clip_core::files::write_covered(&run.join(SIMILARITY), serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// Draws one matrix as a labelled PNG heat map.
    pub fn heat_map(&self, path: &Path, m: &[Vec<f32>], title: &str) -> Result<()> {
        plot::heat_map(
            path,
            m,
            &plot::HeatMap {
                title,
                row_axis: "image",
                col_axis: "caption",
                row_names: &self.images,
                col_names: &self.captions,
                lo: -1.0,
                hi: 1.0,
                value_label: "cosine similarity",
                see_also: "report.html",
            },
        )
    }
}

/// A sample of images ranked against a sample of captions with the trained model.
pub struct Ranking {
    /// Dataset image indices (rows).
    pub images: Vec<usize>,
    /// Distinct caption texts (columns).
    pub captions: Vec<String>,
    /// For each caption, the sampled images it belongs to.
    pub owners: Vec<BTreeSet<usize>>,
    /// Cosine similarity, images × captions.
    pub sim: Vec<Vec<f32>>,
}

impl Ranking {
    /// Embeds an evenly spaced sample of at most [`MAX_IMAGES`] images and their distinct
    /// captions (at most [`MAX_CAPTIONS`]) with the trainer's model, in evaluation mode.
    pub fn compute(t: &Trainer) -> Result<Self> {
        let ds = &t.data().dataset;
        let store = &t.data().store;
        let usable: Vec<usize> = (0..ds.images.len()).filter(|&i| store.contains(i)).collect();
        let step = usable.len().div_ceil(MAX_IMAGES).max(1);
        let images: Vec<usize> = usable.into_iter().step_by(step).take(MAX_IMAGES).collect();
        let row_of: BTreeMap<usize, usize> = images.iter().enumerate().map(|(r, &i)| (i, r)).collect();
        let mut captions: Vec<String> = vec![];
        // The first pair of each distinct caption: what the run embeds it from.
        let mut caption_pairs: Vec<usize> = vec![];
        let mut owners: Vec<BTreeSet<usize>> = vec![];
        let mut col_of: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, p) in ds.pairs.iter().enumerate() {
            let Some(&row) = row_of.get(&p.image) else { continue };
            let col = match col_of.get(p.caption.as_str()) {
                Some(&c) => c,
                None if captions.len() < MAX_CAPTIONS => {
                    col_of.insert(&p.caption, captions.len());
                    captions.push(p.caption.clone());
                    caption_pairs.push(i);
                    owners.push(BTreeSet::new());
                    captions.len() - 1
                }
                None => continue,
            };
            owners[col].insert(row);
        }
        // The run's own embeddings (from cached features where a tower is frozen), as its
        // validation and recall see them.
        let ie = t.embed_images(&images)?;
        let te = t.embed_captions(&caption_pairs)?;
        let sim = to_rows(&cosine_similarity(&ie, &te)?)?;
        Ok(Self {
            images,
            captions,
            owners,
            sim,
        })
    }
}

/// Thumbnails of dataset images as `data:` URIs, made once per run and reused by every report.
#[derive(Default)]
pub struct Thumbnails {
    uris: BTreeMap<usize, Option<String>>,
}

impl Thumbnails {
    /// The thumbnail of dataset image `i` (`None` when it cannot be made; not retried).
    fn get(&mut self, t: &Trainer, i: usize) -> Option<&str> {
        self.uris.entry(i).or_insert_with(|| thumbnail(t, i)).as_deref()
    }
}

/// Image `i` scaled to [`THUMB`] pixels as a JPEG `data:` URI: from its file, or from the decoded
/// square the model sees when the file cannot be read again.
fn thumbnail(t: &Trainer, i: usize) -> Option<String> {
    let from_file = image::open(&t.data().dataset.images[i].path)
        .ok()
        .map(|img| img.thumbnail(THUMB, THUMB).to_rgb8());
    let from_store = || {
        let s = t.data().store.size() as u32;
        t.data()
            .store
            .rgb(i)
            .ok()
            .flatten()
            .and_then(|px| image::RgbImage::from_raw(s, s, px.to_vec()))
            .map(|img| image::imageops::thumbnail(&img, THUMB.min(s), THUMB.min(s)))
    };
    let img = from_file.or_else(from_store)?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 80)
        .encode_image(&img)
        .ok()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes.get_ref());
    Some(format!("data:image/jpeg;base64,{b64}"))
}

/// Writes `report.html` into the run folder and returns its path. `ranking` is the trained
/// model's (at the end of a run); without it, the page has everything else (after each epoch).
pub fn write(t: &Trainer, fixed: &Fixed, ranking: Option<&Ranking>, thumbs: &mut Thumbnails) -> Result<PathBuf> {
    let html = render(t, fixed, ranking, thumbs)?;
    let path = t.out().join(REPORT);
    clip_core::files::write_covered(&path, html.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Text with `& < > " '` escaped, for HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// An inline SVG from plotters, made to fit the page: the namespace attribute is left out (HTML
/// needs none, and the page then names no URL at all) and the fixed size becomes a maximum.
fn inline_svg(svg: &str) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
        .replacen("<svg ", "<svg class=\"plot\" ", 1)
}

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK TC","PingFang TC","Microsoft JhengHei",sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;color:#222;background:#fff}
h1{font-size:1.5em;margin:20px 0 4px} h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav a{margin-right:12px} code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
pre{background:#f6f6f6;padding:10px;overflow:auto;max-height:28em}
.plots{display:flex;flex-wrap:wrap;gap:8px} svg.plot{width:100%;max-width:580px;height:auto;border:1px solid #eee}
table{border-collapse:collapse} td,th{padding:3px 6px;text-align:left;vertical-align:top}
table.kv td:first-child{color:#555;padding-right:16px}
.th{display:inline-block;width:48px;height:48px;background-size:cover;background-position:center;border-radius:3px;vertical-align:middle;background-color:#eee}
.th.big{width:96px;height:96px}
.mats{display:flex;flex-wrap:wrap;gap:24px}
table.sim td.v{width:30px;height:30px;text-align:center;font-size:10px;padding:0;border:1px solid #fff}
table.sim td.v.diag{outline:2px solid #000;outline-offset:-2px}
table.sim th.cap{writing-mode:vertical-rl;max-height:9em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-weight:normal;font-size:12px;padding:2px}
table.sim td.name{font-size:12px;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:270px}
.card .name{font-weight:600;font-size:13px;word-break:break-all}
ol.best{margin:6px 0 0;padding-left:22px;font-size:13px} ol.best li{margin:2px 0}
.own{color:#1a7f37;font-weight:600} .score{color:#666;font-variant-numeric:tabular-nums}
.held{color:#8a6d00;font-size:12px}
table.c2i td{border-bottom:1px solid #eee} table.c2i td.caption{max-width:28em} table.c2i figure{display:inline-block;margin:0 8px 0 0;text-align:center;font-size:11px;width:96px;vertical-align:top}
table.c2i figcaption{overflow-wrap:anywhere} table.c2i figcaption .score{display:block}
.note{color:#555;font-size:13px}
"#;

/// A fine-tune's table: the untouched checkpoint, every epoch and each WiSE-FT α, validated.
fn start_table(w: &mut String, t: &Trainer, start: &clip_core::fit::Validation) -> Result<()> {
    let zs = start.zero_shot.is_some();
    writeln!(
        w,
        "<h3>Before and after, on the validation split</h3><table class=\"c2i\"><tr><th></th><th>val loss</th><th>R@1 image→text</th><th>R@1 text→image</th>{}</tr>",
        if zs { "<th>zero-shot accuracy</th>" } else { "" }
    )?;
    let mut row = |name: String, loss: f64, i2t: f64, t2i: f64, zero_shot: Option<f64>| {
        writeln!(
            w,
            "<tr><td>{}</td><td>{loss:.4}</td><td>{i2t:.3}</td><td>{t2i:.3}</td>{}</tr>",
            escape(&name),
            zero_shot.map(|a| format!("<td>{a:.3}</td>")).unwrap_or_default()
        )
    };
    row(
        "start (the checkpoint)".into(),
        start.loss,
        start.recall.i2t_r1,
        start.recall.t2i_r1,
        start.zero_shot,
    )?;
    for r in &t.state().history {
        row(
            format!("epoch {}", r.epoch),
            r.val_loss,
            r.recall.i2t_r1,
            r.recall.t2i_r1,
            r.zero_shot,
        )?;
    }
    if let Some(wise) = &t.state().wise_ft {
        for p in &wise.points {
            let v = &p.validation;
            let kept = if p.alpha == wise.chosen { " (kept)" } else { "" };
            row(
                format!("WiSE-FT α {}{kept}", p.alpha),
                v.loss,
                v.recall.i2t_r1,
                v.recall.t2i_r1,
                v.zero_shot,
            )?;
        }
    }
    writeln!(w, "</table>")?;
    Ok(())
}

/// A distillation's table: the teacher beside the student.
fn distill_table(w: &mut String, d: &clip_core::distill::Summary) -> Result<()> {
    let zs = d.student_zero_shot.is_some();
    writeln!(
        w,
        "<h3>Teacher and student, on the validation {}</h3><table class=\"c2i\"><tr><th></th><th>parameters</th><th>weights</th><th>images/s</th><th>captions/s</th>{}{}<th>top-1 agreement</th></tr>",
        if d.images_only { "images" } else { "split" },
        if d.images_only { "" } else { "<th>R@1 image→text</th><th>R@1 text→image</th>" },
        if zs { "<th>zero-shot accuracy</th>" } else { "" }
    )?;
    let mut row = |name: &str,
                   f: Option<clip_core::distill::Footprint>,
                   r: Option<clip_core::retrieval::Recall>,
                   z: Option<f64>,
                   a: Option<f64>| {
        let dash = || "<td>–</td>".to_string();
        let fp = f.map_or(format!("{}{}{}{}", dash(), dash(), dash(), dash()), |f| {
            format!(
                "<td>{:.2} M</td><td>{:.1} MB</td><td>{:.0}</td><td>{:.0}</td>",
                f.parameters as f64 / 1e6,
                f.weight_bytes as f64 / 1e6,
                f.images_per_second,
                f.captions_per_second
            )
        });
        let recall = match r {
            Some(r) => format!("<td>{:.3}</td><td>{:.3}</td>", r.i2t_r1, r.t2i_r1),
            None if d.images_only => String::new(),
            None => format!("{}{}", dash(), dash()),
        };
        let zero_shot = if zs {
            z.map_or(dash(), |z| format!("<td>{z:.3}</td>"))
        } else {
            String::new()
        };
        let agreement = a.map_or(dash(), |a| format!("<td>{a:.3}</td>"));
        writeln!(
            w,
            "<tr><td>{}</td>{fp}{recall}{zero_shot}{agreement}</tr>",
            escape(name)
        )
    };
    row(
        &format!("teacher ({})", d.teacher),
        d.teacher_footprint,
        d.teacher_recall,
        d.teacher_zero_shot,
        None,
    )?;
    row("student, at the start", None, None, None, d.agreement_start)?;
    row(
        "student",
        d.student_footprint,
        d.student_recall,
        d.student_zero_shot,
        Some(d.agreement),
    )?;
    writeln!(
        w,
        "</table><p class=\"note\">Speed on random inputs of each model's own shapes, batches of 16, measured one after the other at the start of the run on this machine. {}</p>",
        if d.images_only {
            "Images without captions: agreement is each validation image's nearest other image, the student's against the teacher's."
        } else {
            "Agreement: the share of validation images whose best caption is the same for the student as for the teacher."
        }
    )?;
    Ok(())
}

fn render(t: &Trainer, fixed: &Fixed, ranking: Option<&Ranking>, thumbs: &mut Thumbnails) -> Result<String> {
    let ds = &t.data().dataset;
    let run_name = t
        .out()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| t.out().display().to_string());
    let mut body = String::new();
    let w = &mut body;
    header(w, t, ranking.is_some(), &run_name)?;
    curves(w, t)?;
    similarity(w, ds, fixed)?;
    image_rankings(w, t, ranking)?;
    caption_rankings(w, ds, ranking)?;
    data_and_config(w, t)?;

    // The page: thumbnails as CSS classes (of the images that appear), then the body.
    let mut shown: BTreeSet<usize> = fixed.pairs.iter().map(|&p| ds.pairs[p].image).collect();
    if let Some(r) = ranking {
        shown.extend(r.images.iter().copied());
    }
    let mut css = String::from(STYLE);
    for &i in &shown {
        if let Some(uri) = thumbs.get(t, i) {
            writeln!(css, ".t{i}{{background-image:url({uri})}}")?;
        }
    }
    Ok(format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>clipmine run {}</title>\n<style>{css}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(&run_name)
    ))
}

/// Image `i`'s thumbnail: an element of its CSS class (declared once in the page's style).
fn thumb(ds: &Dataset, i: usize, big: bool) -> String {
    let name = escape(&ds.images[i].name);
    format!(
        "<span class=\"th{} t{i}\" role=\"img\" aria-label=\"{name}\" title=\"{name}\"></span>",
        if big { " big" } else { "" }
    )
}

/// The title, where training stands, and the page's links to its sections.
fn header(w: &mut String, t: &Trainer, finished: bool, run_name: &str) -> Result<()> {
    let h = &t.state().history;
    writeln!(w, "<h1>clipmine run <code>{}</code></h1>", escape(run_name))?;
    let status = match (finished, h.last()) {
        (true, _) => format!(
            "Finished: {} epochs; best model from epoch {} (validation loss {:.4}).",
            t.state().epoch,
            t.state().best_epoch,
            t.state().best_val_loss
        ),
        (false, Some(r)) => format!(
            "In progress: epoch {} of {} done (validation loss {:.4}); the rankings appear when training ends.",
            r.epoch,
            t.cfg().train.epochs,
            r.val_loss
        ),
        (false, None) => "Training has not finished an epoch yet.".to_string(),
    };
    writeln!(w, "<p>{}</p>", escape(&status))?;
    writeln!(w, "<nav><a href=\"#curves\">Curves</a><a href=\"#similarity\">Similarity</a><a href=\"#images\">Image → captions</a><a href=\"#captions\">Caption → images</a><a href=\"#data\">Data</a><a href=\"#config\">Config</a></nav>")?;
    Ok(())
}

/// The training curves, a fine-tune's and a distillation's tables, and the last epoch in words.
fn curves(w: &mut String, t: &Trainer) -> Result<()> {
    let h = &t.state().history;
    writeln!(w, "<h2 id=\"curves\">Training curves</h2>")?;
    if h.is_empty() {
        writeln!(w, "<p class=\"note\">No epoch finished yet.</p>")?;
        return Ok(());
    }
    let c = Curves::new(h, t.cfg().train.freeze_image, t.cfg().train.freeze_text).with_start(t.state().start.as_ref());
    writeln!(w, "<div class=\"plots\">")?;
    for p in [c.loss(), c.lr(), c.quality()] {
        writeln!(w, "{}", inline_svg(&plot::line_plot_svg(&p)?))?;
    }
    if let Some(wise) = &t.state().wise_ft {
        writeln!(w, "{}", inline_svg(&plot::line_plot_svg(&plot::wise_ft(wise).plot())?))?;
    }
    writeln!(w, "</div>")?;
    if let Some(start) = &t.state().start {
        start_table(w, t, start)?;
    }
    if let Some(d) = &t.state().distillation {
        distill_table(w, d)?;
    }
    let last = h.last().expect("not empty");
    writeln!(
        w,
        "<p class=\"note\">Last epoch: train loss {:.4}, validation loss {:.4}, recall@1 image→text {:.3}, text→image {:.3}{}; {:.0} pairs/s.</p>",
        last.train_loss,
        last.val_loss,
        last.recall.i2t_r1,
        last.recall.t2i_r1,
        last.zero_shot.map(|a| format!(", zero-shot accuracy {a:.3}")).unwrap_or_default(),
        last.pairs_per_second
    )?;
    Ok(())
}

/// The fixed batch's similarity matrix before and after training.
fn similarity(w: &mut String, ds: &Dataset, fixed: &Fixed) -> Result<()> {
    writeln!(
        w,
        "<h2 id=\"similarity\">Similarity of a fixed batch, before and after training</h2>"
    )?;
    writeln!(w, "<p class=\"note\">Rows are images, columns their captions (the same order): cosine similarity from −1 (blue) to 1 (red). Training should light up the outlined diagonal.</p><div class=\"mats\">")?;
    for (title, m) in [
        ("Before training", &fixed.before),
        ("After training (best model)", &fixed.after),
    ] {
        let Some(m) = m else { continue };
        writeln!(w, "<div><h3>{title}</h3><table class=\"sim\"><tr><th></th>")?;
        for (j, c) in fixed.captions.iter().enumerate() {
            writeln!(w, "<th class=\"cap\" title=\"{0}\">{j} {0}</th>", escape(c))?;
        }
        writeln!(w, "</tr>")?;
        for (i, row) in m.iter().enumerate() {
            let img = ds.pairs[fixed.pairs[i]].image;
            write!(
                w,
                "<tr><td class=\"name\">{} {i} {}</td>",
                thumb(ds, img, false),
                escape(&fixed.images[i])
            )?;
            for (j, v) in row.iter().enumerate() {
                write!(
                    w,
                    "<td class=\"v{}\" style=\"background:{}\" title=\"{} ↔ {}: {v:.3}\">{v:.2}</td>",
                    if i == j { " diag" } else { "" },
                    plot::css_colour(*v, -1.0, 1.0),
                    escape(&fixed.images[i]),
                    escape(&fixed.captions[j])
                )?;
            }
            writeln!(w, "</tr>")?;
        }
        writeln!(w, "</table></div>")?;
    }
    writeln!(w, "</div>")?;
    Ok(())
}

/// Each ranked image's best captions, its own marked (at the end of a run).
fn image_rankings(w: &mut String, t: &Trainer, ranking: Option<&Ranking>) -> Result<()> {
    let ds = &t.data().dataset;
    writeln!(w, "<h2 id=\"images\">Best captions for each image</h2>")?;
    let Some(r) = ranking else {
        writeln!(w, "<p class=\"note\">Written when training ends.</p>")?;
        return Ok(());
    };
    let held_out: BTreeSet<usize> = if t.data().split.is_fallback() {
        BTreeSet::new()
    } else {
        t.data().split.val.iter().map(|&p| ds.pairs[p].image).collect()
    };
    writeln!(
        w,
        "<p class=\"note\">{} images (of {}) against their {} distinct captions; <span class=\"own\">✓</span> marks the image's own caption.</p><div class=\"cards\">",
        r.images.len(),
        ds.images.len(),
        r.captions.len()
    )?;
    for (row, &img) in r.images.iter().enumerate() {
        write!(
            w,
            "<div class=\"card\">{} <span class=\"name\">{}</span>{}<ol class=\"best\">",
            thumb(ds, img, true),
            escape(&ds.images[img].name),
            if held_out.contains(&img) {
                " <span class=\"held\">(validation)</span>"
            } else {
                ""
            }
        )?;
        for &c in argsort_desc(&r.sim[row]).iter().take(TOP) {
            let own = r.owners[c].contains(&row);
            write!(
                w,
                "<li{}>{}{} <span class=\"score\">{:.3}</span></li>",
                if own { " class=\"own\"" } else { "" },
                if own { "✓ " } else { "" },
                escape(&r.captions[c]),
                r.sim[row][c]
            )?;
        }
        writeln!(w, "</ol></div>")?;
    }
    writeln!(w, "</div>")?;
    Ok(())
}

/// Each distinct caption's best images, its own marked (at the end of a run).
fn caption_rankings(w: &mut String, ds: &Dataset, ranking: Option<&Ranking>) -> Result<()> {
    writeln!(w, "<h2 id=\"captions\">Best images for each caption</h2>")?;
    let Some(r) = ranking else {
        writeln!(w, "<p class=\"note\">Written when training ends.</p>")?;
        return Ok(());
    };
    writeln!(w, "<table class=\"c2i\">")?;
    for (c, caption) in r.captions.iter().enumerate() {
        let col: Vec<f32> = r.sim.iter().map(|row| row[c]).collect();
        write!(w, "<tr><td class=\"caption\">{}</td><td>", escape(caption))?;
        for &row in argsort_desc(&col).iter().take(TOP) {
            let img = r.images[row];
            let own = r.owners[c].contains(&row);
            write!(
                w,
                "<figure>{}<figcaption{}>{}{} <span class=\"score\">{:.3}</span></figcaption></figure>",
                thumb(ds, img, false),
                if own { " class=\"own\"" } else { "" },
                if own { "✓ " } else { "" },
                escape(&ds.images[img].name),
                col[row]
            )?;
        }
        writeln!(w, "</td></tr>")?;
    }
    writeln!(w, "</table>")?;
    Ok(())
}

/// The data (source, counts, split, classes) and the run's config.toml.
/// The global batch, the ranks that share it and the micro-batches the towers see.
fn describe_batch(t: &Trainer) -> String {
    let tr = &t.cfg().train;
    let mut s = format!("{} pairs per step", tr.batch_size * tr.accumulate);
    if let Some(w) = t.world() {
        s += &format!(", on {} ranks ({} pairs each)", w.size(), tr.batch_size / w.size());
    }
    if tr.micro_batch > 0 {
        s += &format!(", through the towers {} at a time (gradient cache)", tr.micro_batch);
    }
    s
}

fn data_and_config(w: &mut String, t: &Trainer) -> Result<()> {
    let ds = &t.data().dataset;
    writeln!(w, "<h2 id=\"data\">Data</h2><table class=\"kv\">")?;
    let split = &t.data().split;
    let mut rows: Vec<(&str, String)> = vec![
        ("source", format!("{} ({})", ds.root.display(), ds.source)),
        ("pairs", ds.pairs.len().to_string()),
        ("images", ds.images.len().to_string()),
        ("training pairs", split.train.len().to_string()),
        ("validation pairs", split.val.len().to_string()),
    ];
    if let Some(n) = &split.note {
        rows.push(("split", n.clone()));
    }
    rows.push(("batch", describe_batch(t)));
    if !ds.labels.is_empty() {
        rows.push((
            "classes",
            format!(
                "{}: {}",
                ds.labels.len(),
                clip_core::listing::first_n(&ds.labels, 12, ", ")
            ),
        ));
    }
    if !ds.bad.is_empty() {
        rows.push(("skipped rows", ds.bad.len().to_string()));
    }
    for (k, v) in rows {
        writeln!(w, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(&v))?;
    }
    writeln!(w, "</table>")?;
    writeln!(
        w,
        "<h2 id=\"config\">Config</h2><p class=\"note\">config.toml of this run ({}, loss {}).</p><pre>{}</pre>",
        escape(&t.cfg().name),
        escape(&t.cfg().loss.to_string()),
        escape(&t.cfg().to_toml()?)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape(r#"<script>alert("x & 'y'")</script> 人蔘"#),
            "&lt;script&gt;alert(&quot;x &amp; &#39;y&#39;&quot;)&lt;/script&gt; 人蔘"
        );
    }

    #[test]
    fn inline_svg_names_no_url_and_scales() {
        let svg = r#"<svg width="720" height="440" viewBox="0 0 720 440" xmlns="http://www.w3.org/2000/svg"><text>x</text></svg>"#;
        let s = inline_svg(svg);
        assert!(!s.contains("http"), "{s}");
        assert!(s.starts_with("<svg class=\"plot\" "), "{s}");
    }
}
