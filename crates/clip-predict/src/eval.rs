//! `eval`: zero-shot accuracy on class folders, or retrieval on a captioned dataset.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{Device, Tensor};
use clip_core::data::{Dataset, ImageStore, LoadOptions};
use clip_core::embed::l2_normalize;
use clip_core::progress::Silent;
use clip_core::retrieval::{argsort_desc, to_rows, Recall};
use serde_json::json;

use crate::model::{load, Loaded, Origin};
use crate::table::fit;
use crate::ModelChoice;

#[allow(clippy::too_many_arguments)]
pub(crate) fn eval(
    choice: &ModelChoice,
    data: &Path,
    templates: Vec<String>,
    confusion: Option<&Path>,
    batch_size: usize,
    skip_bad: bool,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let mut opts = LoadOptions {
        skip_bad,
        ..LoadOptions::default()
    };
    // One argument without {label} that names a file: the templates are its lines.
    let templates = match templates.as_slice() {
        [one] if !one.contains("{label}") && Path::new(one).is_file() => {
            clip_core::data::read_templates(Path::new(one))?
        }
        _ => templates,
    };
    if !templates.is_empty() {
        opts.templates = templates.clone();
    }
    let ds = Dataset::load(data, &opts)?;
    let cfg = &m.model.config;
    let (store, bad) = ImageStore::load(&ds, cfg, skip_bad, progress(json).as_ref())?;
    for b in &bad {
        eprintln!("skipped: {b}");
    }
    let started = std::time::Instant::now();
    let all: Vec<usize> = (0..ds.images.len()).filter(|i| store.contains(*i)).collect();
    let img = l2_normalize(&clip_core::embed::embed_store_images(
        &m.model, &store, &all, batch_size, device,
    )?)?;
    let e = Embedded {
        m: &m,
        choice,
        data,
        ds: &ds,
        all: &all,
        img: &img,
        batch_size,
        device,
    };
    if !ds.labels.is_empty() {
        zero_shot(&e, templates, confusion, json, started)?;
    } else {
        retrieval(&e, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What either evaluation reads: the model, the data, the images that could be read (dataset
/// indices) and their normalised embeddings (one row each, in that order).
struct Embedded<'a> {
    m: &'a Loaded,
    /// How the model was named, and the data folder: CLIP_benchmark's `pretrained` and `dataset`.
    choice: &'a ModelChoice,
    data: &'a Path,
    ds: &'a Dataset,
    all: &'a [usize],
    img: &'a Tensor,
    batch_size: usize,
    device: &'a Device,
}

/// Zero-shot classification of class folders: accuracy, per class and overall, and the confusion
/// matrix (printed, or as JSON; drawn to `confusion` when given).
fn zero_shot(
    e: &Embedded,
    templates: Vec<String>,
    confusion: Option<&Path>,
    json: bool,
    started: std::time::Instant,
) -> Result<()> {
    let (ds, all) = (e.ds, e.all);
    let templates = class_templates(e, templates);
    let classes = class_embeddings(e, &templates)?;
    let sims = to_rows(&e.img.matmul(&classes.t()?)?)?;
    let n = ds.labels.len();
    let (matrix, correct, top5) = confusion_matrix(e, &sims);
    let accuracy = correct as f64 / all.len().max(1) as f64;
    let per_class: Vec<_> = matrix
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let n: usize = r.iter().sum();
            json!({"label": ds.labels[i], "images": n, "correct": r[i], "accuracy": r[i] as f64 / n.max(1) as f64})
        })
        .collect();
    if let Some(p) = confusion {
        draw_confusion(p, &matrix, &ds.labels)?;
    }
    let secs = started.elapsed().as_secs_f64();
    if json {
        let metrics = crate::benchmark_format::classification(&matrix, top5);
        let mut out = crate::benchmark_format::result(
            e.data,
            &e.m.model.config.name,
            e.choice,
            "zeroshot_classification",
            metrics,
        );
        if let serde_json::Value::Object(ours) = json!({"kind": "zero-shot", "images": all.len(), "classes": ds.labels, "accuracy": accuracy, "per_class": per_class, "confusion": matrix, "templates": templates, "seconds": secs, "precision": clip_core::nn::precision().name()})
        {
            out.extend(ours);
        }
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "zero-shot accuracy on {} images of {} classes: {accuracy:.4} ({} templates)",
        all.len(),
        n,
        templates.len()
    );
    println!("  {:<24} {:>7} {:>8}", "class", "images", "accuracy");
    for c in &per_class {
        println!(
            "  {} {:>7} {:>8.4}",
            fit(c["label"].as_str().unwrap_or(""), 24),
            c["images"],
            c["accuracy"].as_f64().unwrap_or(0.0)
        );
    }
    println!("templates: {}", templates.join(" | "));
    print_confusion(&matrix, &ds.labels);
    if let Some(p) = confusion {
        println!("confusion matrix: {}", p.display());
    }
    Ok(())
}

/// The confusion matrix (true class down, predicted across) of the images' class similarities
/// `sims` (one row per image of `e.all`), with the number of images classified right and of those
/// whose class was among the 5 best.
fn confusion_matrix(e: &Embedded, sims: &[Vec<f32>]) -> (Vec<Vec<usize>>, usize, usize) {
    let ds = e.ds;
    let n = ds.labels.len();
    let mut matrix = vec![vec![0usize; n]; n];
    let mut image_label = vec![usize::MAX; ds.images.len()];
    for p in &ds.pairs {
        if let Some(lab) = p.label {
            image_label[p.image] = lab;
        }
    }
    let (mut correct, mut top5) = (0, 0);
    for (row, &i) in e.all.iter().enumerate() {
        let order = argsort_desc(&sims[row]);
        let truth = image_label[i];
        if truth < n {
            matrix[truth][order[0]] += 1;
            correct += (truth == order[0]) as usize;
            top5 += order.iter().take(5).any(|&c| c == truth) as usize;
        }
    }
    (matrix, correct, top5)
}

/// The templates each class is captioned with: those given; else a pretrained CLIP's built-in
/// ensemble; else the training default. (A student distilled on images alone reads captions
/// with its teacher's text tower.)
fn class_templates(e: &Embedded, templates: Vec<String>) -> Vec<String> {
    let pretrained_text = match (&e.m.origin, &e.m.captions_by) {
        (_, Some(t)) => t.pretrained(),
        (Origin::Checkpoint { .. }, None) => true,
        (Origin::Run(_), None) => false,
    };
    match (pretrained_text, templates.is_empty()) {
        (_, false) => templates,
        (true, true) => clip_core::data::default_ensemble(&e.ds.labels),
        (false, true) => vec![clip_core::data::DEFAULT_TEMPLATE.to_string()],
    }
}

/// One text embedding per class (classes × dim, normalised): the mean of its templates'
/// normalised embeddings.
fn class_embeddings(e: &Embedded, templates: &[String]) -> Result<Tensor> {
    let mut class_emb = vec![];
    for label in &e.ds.labels {
        let texts: Vec<String> = templates
            .iter()
            .map(|t| clip_core::data::render_template(t, label))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let emb = l2_normalize(&e.m.embed_texts(&refs, e.batch_size, e.device)?)?;
        class_emb.push(emb.mean(0)?);
    }
    l2_normalize(&Tensor::stack(&class_emb, 0)?)
}

/// The confusion matrix as a heat map, each row as shares of its images.
fn draw_confusion(path: &Path, matrix: &[Vec<usize>], labels: &[String]) -> Result<()> {
    let rows: Vec<Vec<f32>> = matrix
        .iter()
        .map(|r| {
            let s: usize = r.iter().sum();
            r.iter().map(|&c| c as f32 / s.max(1) as f32).collect()
        })
        .collect();
    clip_cli::plot::heat_map(
        path,
        &rows,
        &clip_cli::plot::HeatMap {
            title: "Zero-shot confusion matrix (each row sums to 1)",
            row_axis: "true class",
            col_axis: "predicted class",
            row_names: labels,
            col_names: labels,
            lo: 0.0,
            hi: 1.0,
            value_label: "share of the row",
            see_also: "the --json output",
        },
    )
}

/// The confusion matrix as a table of counts, true classes down, predicted across.
fn print_confusion(matrix: &[Vec<usize>], labels: &[String]) {
    print!("{:>14} ", "true \\ pred");
    for j in 0..labels.len() {
        print!("{:>6}", j);
    }
    println!();
    for (i, r) in matrix.iter().enumerate() {
        print!("{} ", fit(&format!("{i} {}", labels[i]), 14));
        for c in r {
            print!("{c:>6}");
        }
        println!();
    }
}

/// Caption dataset: recall both ways over every pair whose image could be read.
fn retrieval(e: &Embedded, json: bool) -> Result<()> {
    let (ds, all) = (e.ds, e.all);
    let pos: std::collections::HashMap<usize, usize> = all.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    let pairs: Vec<_> = ds.pairs.iter().filter(|p| pos.contains_key(&p.image)).collect();
    let texts: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
    let txt = l2_normalize(&e.m.embed_texts(&texts, e.batch_size, e.device)?)?;
    let text_image: Vec<usize> = pairs.iter().map(|p| pos[&p.image]).collect();
    let r = Recall::from_embeddings(e.img, &txt, &text_image, 1024)?;
    if json {
        let metrics = crate::benchmark_format::retrieval(&r);
        let mut out =
            crate::benchmark_format::result(e.data, &e.m.model.config.name, e.choice, "zeroshot_retrieval", metrics);
        if let serde_json::Value::Object(ours) = json!({"kind": "retrieval", "images": all.len(), "captions": texts.len(), "recall": r, "precision": clip_core::nn::precision().name()})
        {
            out.extend(ours);
        }
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("retrieval on {} images / {} captions", all.len(), texts.len());
        println!(
            "  image → text  R@1 {:.3}  R@5 {:.3}  R@10 {:.3}",
            r.i2t_r1, r.i2t_r5, r.i2t_r10
        );
        println!(
            "  text → image  R@1 {:.3}  R@5 {:.3}  R@10 {:.3}",
            r.t2i_r1, r.t2i_r5, r.t2i_r10
        );
    }
    Ok(())
}

/// A terminal progress bar, or nothing when the output is JSON.
fn progress(json: bool) -> Box<dyn clip_core::progress::Progress> {
    if json {
        Box::new(Silent)
    } else {
        Box::new(clip_cli::progress::Bar::new())
    }
}
