//! `index` and `text-to-image`: an image folder embedded once, and searched by a caption.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use candle_core::Device;
use clip_core::embed::l2_normalize;
use clip_core::index::{GraphPolicy, ImageIndex, IndexOptions, SearchMode};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::model::{default_index, load};
use crate::ModelChoice;

pub(crate) fn index(
    choice: &ModelChoice,
    images: &Path,
    out: Option<PathBuf>,
    batch_size: usize,
    approx: GraphPolicy,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    let out = match out {
        Some(o) => o,
        None => default_index(choice)?,
    };
    // Before anything is embedded: the index goes into a folder of its own (new, empty, or
    // holding an index), never among other files, which its cleanup could otherwise remove.
    ImageIndex::check_folder(&out)?;
    let m = load(choice, device)?;
    let previous = if out.join(clip_core::index::MANIFEST).is_file() {
        Some(ImageIndex::load(&out)?)
    } else {
        None
    };
    let fp = m.fingerprint()?;
    let bar = ProgressBar::new(clip_core::index::list_images(images)?.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("embedding [{bar:30}] {pos}/{len} {per_sec}")
            .unwrap()
            .progress_chars("=> "),
    );
    let opts = IndexOptions {
        graph: approx,
        ..IndexOptions::default()
    };
    let (mut idx, stats) = ImageIndex::update(previous, &m.model, &fp, images, batch_size, &opts, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    idx.save(&out)?;
    let (segments, graphs, lists) = idx.segment_counts();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"index": out.display().to_string(), "images": idx.entries.len(), "segments": segments, "graphs": graphs, "lists": lists, "format_version": clip_core::index::FORMAT_VERSION, "stats": stats, "precision": clip_core::nn::precision().name()})
            )?
        );
    } else {
        println!(
            "index {}: {} images ({} embedded, {} unchanged, {} removed, {} unreadable; {segments} segments, {graphs} with an HNSW graph, {lists} with k-means lists) in {:.1}s, {:.1} images/s",
            out.display(),
            idx.entries.len(),
            stats.embedded,
            stats.reused,
            stats.removed,
            stats.failed.len(),
            stats.seconds,
            stats.images_per_second
        );
        for (p, r) in &stats.failed {
            eprintln!("  unreadable: {p}: {r}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn text_to_image(
    choice: &ModelChoice,
    text: &str,
    index: Option<&Path>,
    images: Option<&Path>,
    top: usize,
    mode: SearchMode,
    sheet: Option<&Path>,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let idx = match (index, images) {
        (Some(dir), _) => {
            let idx = ImageIndex::load(dir)?;
            m.check_index(&idx, dir)?;
            idx
        }
        (None, Some(folder)) => {
            let fp = m.fingerprint()?;
            let opts = IndexOptions {
                graph: GraphPolicy::Never,
                ..IndexOptions::default()
            };
            let (idx, stats) = ImageIndex::update(None, &m.model, &fp, folder, 64, &opts, |_| {})?;
            for (p, r) in &stats.failed {
                eprintln!("error: {p}: {r}");
            }
            idx
        }
        (None, None) => {
            bail!("search an --index (see `clip-predict index`) or a folder of --images")
        }
    };
    let q = l2_normalize(&m.embed_texts(&[text], 1, device)?)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let t = std::time::Instant::now();
    let hits = idx.search_with(&q, top, mode)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let rows: Vec<_> = hits
        .iter()
        .map(|(i, s)| json!({"image": idx.path_of(*i).display().to_string(), "score": s}))
        .collect();
    if let Some(path) = sheet {
        let items: Vec<(PathBuf, f32)> = hits.iter().map(|(i, s)| (idx.path_of(*i), *s)).collect();
        contact_sheet(path, text, &items)?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"text": text, "results": rows, "search_ms": ms, "indexed": idx.entries.len()})
            )?
        );
    } else {
        println!("{text}  ({} images searched in {ms:.1} ms)", idx.entries.len());
        println!("  {:<4} {:>7}  image", "rank", "cosine");
        for (k, r) in rows.iter().enumerate() {
            println!(
                "  {:<4} {:>7.3}  {}",
                k + 1,
                r["score"].as_f64().unwrap_or(0.0),
                r["image"].as_str().unwrap_or("")
            );
        }
        if let Some(p) = sheet {
            println!("contact sheet: {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A grid of thumbnails (3 per row), each with its rank, score and file name under it.
fn contact_sheet(path: &Path, query: &str, items: &[(PathBuf, f32)]) -> Result<()> {
    let tiles: Vec<clip_cli::plot::Tile> = items
        .iter()
        .enumerate()
        .map(|(k, (p, score))| clip_cli::plot::Tile {
            image: image::open(p).ok().map(|i| i.to_rgb8()),
            lines: vec![
                format!("#{}  cosine {score:.3}", k + 1),
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ],
        })
        .collect();
    let title = if clip_cli::plot::drawable(query) {
        format!("Best images for \"{}\"", clip_cli::plot::shorten(query, 40))
    } else {
        "Best images for the query (its text is in the table printed)".to_string()
    };
    clip_cli::plot::contact_sheet(path, &title, &tiles)
}
