use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clip_core::config::LossKind;
use clip_core::data::{Dataset, ImageStore, LoadOptions, TextTokenizer};
use clip_core::distill::Teacher;
use clip_core::embed::embed_texts;
use clip_core::hub::Hub;
use clip_core::index::{
    embed_image_files, files_fingerprint, model_fingerprint, GraphPolicy, ImageIndex, IndexOptions, SearchMode,
};
use clip_core::loss::l2_normalize;
use clip_core::pretrained_clip::{self, ClipLoad};
use clip_core::progress::Silent;
use clip_core::retrieval::{argsort_desc, softmax, to_rows, Recall};
use clip_core::run_dir::RunDir;
use clip_core::ClipModel;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::table::fit;
use crate::{Cli, Cmd, ModelChoice};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let device = clip_core::device::parse_device(&cli.device)?;
    // Before any model is loaded (a refused bf16 fails at once). fp32 unless --precision says
    // otherwise: the precision a run was trained in is not carried over to its use.
    clip_cli::activate_precision(cli.precision.unwrap_or_default(), &device)?;
    let json = cli.json;
    match cli.command {
        Cmd::ImageToText {
            model,
            images,
            texts,
            captions,
            top,
        } => image_to_text(&model, &images, texts, captions.as_deref(), top, json, &device),
        Cmd::TextToImage {
            model,
            text,
            index,
            images,
            top,
            mode,
            sheet,
        } => text_to_image(
            &model,
            &text,
            index.as_deref(),
            images.as_deref(),
            top,
            mode,
            sheet.as_deref(),
            json,
            &device,
        ),
        Cmd::Index {
            model,
            images,
            out,
            batch_size,
            approx,
        } => index(&model, &images, out, batch_size, approx, json, &device),
        Cmd::Serve {
            model,
            index,
            addr,
            texts,
            texts_file,
            workers,
            allow_host,
            images,
        } => {
            let texts = if texts.is_empty() && texts_file.is_none() {
                vec![]
            } else {
                candidate_texts(texts, texts_file.as_deref())?
            };
            let index = match index {
                Some(i) => i,
                None => default_index(&model)?,
            };
            crate::serve::serve(
                crate::serve::ServeOptions {
                    model,
                    index,
                    addr,
                    texts,
                    workers,
                    allow_hosts: allow_host,
                    images,
                },
                &device,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Eval {
            model,
            data,
            templates,
            confusion,
            batch_size,
            skip_bad,
        } => eval(
            &model,
            &data,
            templates,
            confusion.as_deref(),
            batch_size,
            skip_bad,
            json,
            &device,
        ),
        Cmd::Export {
            model,
            format,
            out,
            overwrite,
        } => export(&model, format, &out, overwrite, json, &device),
        Cmd::Demo { model, data } => demo(&model, data.unwrap_or_else(Dataset::demo_dir).as_path(), &device),
    }
}

/// Where a loaded model came from.
pub(crate) enum Origin {
    /// A run folder written by stage 4.
    Run(RunDir),
    /// A pretrained CLIP, as its files give it.
    Checkpoint { spec: String, load: ClipLoad },
}

pub(crate) struct Loaded {
    pub origin: Origin,
    pub model: ClipModel,
    pub tok: TextTokenizer,
    /// For a student distilled on images alone: the teacher whose text tower answers its
    /// captions ([`clip_core::distill::caption_teacher`]).
    pub captions_by: Option<Teacher>,
    /// exp(logit scale) for the clip loss; 1/T for the soft loss (whose logits are raw dot products).
    pub scale: f32,
}

impl Loaded {
    /// The model and tokenizer that embed captions: the teacher's for a student distilled on
    /// images alone, else the model's own.
    pub fn text_side(&self) -> (&ClipModel, &TextTokenizer) {
        match &self.captions_by {
            Some(t) => (&t.model, &t.tokenizer),
            None => (&self.model, &self.tok),
        }
    }

    /// Caption embeddings (N, P), as the model answers them ([`Loaded::text_side`]).
    pub fn embed_texts(&self, texts: &[&str], chunk: usize, device: &Device) -> Result<Tensor> {
        let (model, tok) = self.text_side();
        embed_texts(model, tok, texts, chunk, device)
    }

    /// The id an index records of the model that embedded it.
    pub fn fingerprint(&self) -> Result<String> {
        match &self.origin {
            Origin::Run(run) => model_fingerprint(&run.dir),
            // The files, and how its images are prepared (read from its preprocessor_config.json
            // or open_clip config, not among the files hashed): an index embedded with other
            // preprocessing is another model's.
            Origin::Checkpoint { load, .. } => {
                let files = files_fingerprint(&[&load.config_file, &load.weights_file])?;
                let prep = clip_core::data::Preprocess::from_config(&self.model.config);
                let c = &self.model.config;
                let how = format!(
                    "{}|{}|{:?}|{:?}|{}",
                    prep.cache_variant(),
                    c.image.image_size,
                    c.image.mean,
                    c.image.std,
                    c.image.resize.unwrap_or(0)
                );
                Ok(format!("{files}-{:08x}", crc_of(how.as_bytes())))
            }
        }
    }

    /// How to name this model on a command line (for hints).
    pub fn flag(&self) -> String {
        match &self.origin {
            Origin::Run(run) => format!("--run {}", run.dir.display()),
            Origin::Checkpoint { spec, .. } => format!("--model {spec}"),
        }
    }

    /// Fails when `index` was embedded by another model.
    pub fn check_index(&self, index: &ImageIndex, dir: &Path) -> Result<()> {
        let fp = self.fingerprint()?;
        if index.fingerprint != fp {
            bail!(
                "index {} was made by another model (fingerprint {}, this model {fp}): rebuild it with `clip-predict index {} --images … --out {}`",
                dir.display(),
                index.fingerprint,
                self.flag(),
                dir.display()
            );
        }
        Ok(())
    }
}

/// The index folder when none is given: the run's `index/`; a pretrained model has no folder of
/// its own to keep one in.
fn default_index(choice: &ModelChoice) -> Result<PathBuf> {
    match &choice.run {
        Some(run) => Ok(run.join("index")),
        None => bail!("with --model, name the index folder (--index / --out DIR): a pretrained model has no run folder to keep it in"),
    }
}

pub(crate) fn load(choice: &ModelChoice, device: &Device) -> Result<Loaded> {
    let (origin, model, tok) = match (&choice.run, &choice.model) {
        (Some(run), _) => {
            let run = RunDir::open(run)?;
            let (model, tok) = run.load(device)?;
            (Origin::Run(run), model, tok)
        }
        (None, Some(spec)) => {
            let o = pretrained_clip::open(spec, &Hub::from_env(), device)
                .with_context(|| format!("opening the pretrained CLIP {spec}"))?;
            let origin = Origin::Checkpoint {
                spec: spec.clone(),
                load: o.load,
            };
            (origin, o.model, o.tokenizer)
        }
        (None, None) => bail!("name a model: --run DIR (trained by stage 4) or --model NAME|DIR (a pretrained CLIP)"),
    };
    let captions_by = clip_core::distill::caption_teacher(&model.config, device)?;
    if let Some(t) = &captions_by {
        eprintln!(
            "note: captions are answered by the teacher's text tower ({}): this student was distilled on images alone",
            t.describe
        );
    }
    // The logits are those of whichever model's space the embeddings meet in.
    let scaled = captions_by.as_ref().map_or(&model, |t| &t.model);
    let scale = match scaled.config.loss {
        LossKind::Clip => scaled.logit_scale()?.unwrap_or(1.0),
        LossKind::Soft => (1.0 / scaled.config.temperature) as f32,
    };
    Ok(Loaded {
        origin,
        model,
        tok,
        captions_by,
        scale,
    })
}

/// Candidate captions from --texts, or a file: a dataset's captions file (its caption column) or
/// plain lines.
fn candidate_texts(texts: Vec<String>, file: Option<&Path>) -> Result<Vec<String>> {
    if let Some(f) = file {
        let ds = Dataset::load(
            f,
            &LoadOptions {
                skip_bad: true,
                ..LoadOptions::default()
            },
        );
        let mut seen = BTreeSet::new();
        let list: Vec<String> = match ds {
            Ok(ds) => ds
                .pairs
                .iter()
                .map(|p| p.caption.clone())
                .filter(|c| seen.insert(c.clone()))
                .collect(),
            Err(_) => std::fs::read_to_string(f)
                .with_context(|| format!("reading captions {}", f.display()))?
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty() && seen.insert(l.clone()))
                .collect(),
        };
        if list.is_empty() {
            bail!("{} holds no captions", f.display());
        }
        return Ok(list);
    }
    if texts.is_empty() {
        bail!("give candidate captions with --texts \"…\" \"…\" or --captions FILE");
    }
    Ok(texts)
}

fn image_to_text(
    choice: &ModelChoice,
    images: &[PathBuf],
    texts: Vec<String>,
    captions: Option<&Path>,
    top: usize,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let texts = candidate_texts(texts, captions)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let text_emb = m.embed_texts(&refs, 64, device)?;
    let (img_emb, ok, failed) = embed_image_files(&m.model, &m.model.config, images, 32, |_| {})?;
    for (i, reason) in &failed {
        eprintln!("error: {}: {reason}", images[*i].display());
    }
    let mut out = vec![];
    if let Some(img_emb) = img_emb {
        let cos = to_rows(&img_emb.matmul(&l2_normalize(&text_emb)?.t()?)?)?;
        let logits = logit_rows(&m, &img_emb, &text_emb)?;
        for (row, &i) in ok.iter().enumerate() {
            let order = argsort_desc(&logits[row]);
            let probs = softmax(&logits[row], 1.0);
            let ranked: Vec<_> = order
                .iter()
                .take(top)
                .map(|&j| json!({"caption": texts[j], "score": cos[row][j], "probability": probs[j]}))
                .collect();
            out.push(json!({"image": images[i].display().to_string(), "captions": ranked}));
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"results": out, "errors": failed.iter().map(|(i, r)| json!({"image": images[*i].display().to_string(), "error": r})).collect::<Vec<_>>()})
            )?
        );
    } else {
        for r in &out {
            println!("{}", r["image"].as_str().unwrap_or_default());
            println!("  {:<4} {:>7} {:>7}  caption", "rank", "cosine", "prob");
            for (k, c) in r["captions"].as_array().unwrap().iter().enumerate() {
                println!(
                    "  {:<4} {:>7.3} {:>7.3}  {}",
                    k + 1,
                    c["score"].as_f64().unwrap_or(0.0),
                    c["probability"].as_f64().unwrap_or(0.0),
                    c["caption"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The loss's own logits between (normalised) image embeddings and raw text embeddings.
fn logit_rows(m: &Loaded, img_norm: &Tensor, text_emb: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = l2_normalize(text_emb)?;
    to_rows(&(img_norm.matmul(&t.t()?)? * m.scale as f64)?)
}

#[allow(clippy::too_many_arguments)]
fn text_to_image(
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

fn index(
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
fn eval(
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
    if !ds.labels.is_empty() {
        // Zero-shot: one text embedding per class, the mean of its templates' (normalised) embeddings.
        // Given templates; else a pretrained CLIP's built-in ensemble; else the training default.
        // (A student distilled on images alone reads captions with its teacher's text tower.)
        let pretrained_text = match (&m.origin, &m.captions_by) {
            (_, Some(t)) => t.pretrained(),
            (Origin::Checkpoint { .. }, None) => true,
            (Origin::Run(_), None) => false,
        };
        let templates = match (pretrained_text, templates.is_empty()) {
            (_, false) => templates,
            (true, true) => clip_core::data::default_ensemble(&ds.labels),
            (false, true) => vec![clip_core::data::DEFAULT_TEMPLATE.to_string()],
        };
        let mut class_emb = vec![];
        for label in &ds.labels {
            let texts: Vec<String> = templates
                .iter()
                .map(|t| clip_core::data::render_template(t, label))
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let e = l2_normalize(&m.embed_texts(&refs, batch_size, device)?)?;
            class_emb.push(e.mean(0)?);
        }
        let classes = l2_normalize(&Tensor::stack(&class_emb, 0)?)?;
        let sims = to_rows(&img.matmul(&classes.t()?)?)?;
        let n = ds.labels.len();
        let mut matrix = vec![vec![0usize; n]; n];
        let image_label: Vec<usize> = {
            let mut l = vec![usize::MAX; ds.images.len()];
            for p in &ds.pairs {
                if let Some(lab) = p.label {
                    l[p.image] = lab;
                }
            }
            l
        };
        let mut correct = 0;
        for (row, &i) in all.iter().enumerate() {
            let pred = argsort_desc(&sims[row])[0];
            let truth = image_label[i];
            if truth < n {
                matrix[truth][pred] += 1;
                correct += (truth == pred) as usize;
            }
        }
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
            let rows: Vec<Vec<f32>> = matrix
                .iter()
                .map(|r| {
                    let s: usize = r.iter().sum();
                    r.iter().map(|&c| c as f32 / s.max(1) as f32).collect()
                })
                .collect();
            clip_cli::plot::heat_map(
                p,
                &rows,
                &clip_cli::plot::HeatMap {
                    title: "Zero-shot confusion matrix (each row sums to 1)",
                    row_axis: "true class",
                    col_axis: "predicted class",
                    row_names: &ds.labels,
                    col_names: &ds.labels,
                    lo: 0.0,
                    hi: 1.0,
                    value_label: "share of the row",
                    see_also: "the --json output",
                },
            )?;
        }
        let secs = started.elapsed().as_secs_f64();
        if json {
            println!(
                "{}",
                serde_json::to_string(
                    &json!({"kind": "zero-shot", "images": all.len(), "classes": ds.labels, "accuracy": accuracy, "per_class": per_class, "confusion": matrix, "templates": templates, "seconds": secs, "precision": clip_core::nn::precision().name()})
                )?
            );
        } else {
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
            print!("{:>14} ", "true \\ pred");
            for j in 0..n {
                print!("{:>6}", j);
            }
            println!();
            for (i, r) in matrix.iter().enumerate() {
                print!("{} ", fit(&format!("{i} {}", ds.labels[i]), 14));
                for c in r {
                    print!("{c:>6}");
                }
                println!();
            }
            if let Some(p) = confusion {
                println!("confusion matrix: {}", p.display());
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Caption dataset: recall both ways over every pair whose image could be read.
    let pos: std::collections::HashMap<usize, usize> = all.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    let pairs: Vec<_> = ds.pairs.iter().filter(|p| pos.contains_key(&p.image)).collect();
    let texts: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
    let txt = l2_normalize(&m.embed_texts(&texts, batch_size, device)?)?;
    let text_image: Vec<usize> = pairs.iter().map(|p| pos[&p.image]).collect();
    let r = Recall::from_embeddings(&img, &txt, &text_image, 1024)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(
                &json!({"kind": "retrieval", "images": all.len(), "captions": texts.len(), "recall": r, "precision": clip_core::nn::precision().name()})
            )?
        );
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
    Ok(ExitCode::SUCCESS)
}

/// Each image's best caption and each caption's best image, marked right (✓) or wrong (✗).
fn demo(choice: &ModelChoice, data: &Path, device: &Device) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let ds = Dataset::load(data, &LoadOptions::default())?;
    let (store, _) = ImageStore::load(&ds, &m.model.config, false, &Silent)?;
    let all: Vec<usize> = (0..ds.images.len()).collect();
    let img = l2_normalize(&clip_core::embed::embed_store_images(
        &m.model, &store, &all, 32, device,
    )?)?;
    let texts: Vec<&str> = ds.pairs.iter().map(|p| p.caption.as_str()).collect();
    let txt = l2_normalize(&m.embed_texts(&texts, 64, device)?)?;
    let sim = to_rows(&img.matmul(&txt.t()?)?)?;
    println!("image → text: the best of all {} captions for each image", texts.len());
    let mut right = 0;
    for (i, e) in ds.images.iter().enumerate() {
        let j = argsort_desc(&sim[i])[0];
        let ok = ds.pairs[j].image == i;
        right += ok as usize;
        println!(
            "  {} {} {:.3}  {}",
            if ok { "✓" } else { "✗" },
            fit(&e.name, 18),
            sim[i][j],
            texts[j]
        );
    }
    println!("  {right}/{} images got one of their own captions\n", ds.images.len());
    println!(
        "text → image: the best of all {} images for each caption",
        ds.images.len()
    );
    let mut right_t = 0;
    for (j, p) in ds.pairs.iter().enumerate() {
        let col: Vec<f32> = sim.iter().map(|r| r[j]).collect();
        let i = argsort_desc(&col)[0];
        let ok = i == p.image;
        right_t += ok as usize;
        println!(
            "  {} {} → {} {:.3}",
            if ok { "✓" } else { "✗" },
            fit(&p.caption, 40),
            fit(&ds.images[i].name, 18),
            col[i]
        );
    }
    println!("  {right_t}/{} captions found their own image", ds.pairs.len());
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

/// A terminal progress bar, or nothing when the output is JSON.
fn progress(json: bool) -> Box<dyn clip_core::progress::Progress> {
    if json {
        Box::new(Silent)
    } else {
        Box::new(clip_cli::progress::Bar::new())
    }
}

/// Writes the model as an open_clip or Hugging Face folder and says how to load it.
fn export(
    choice: &ModelChoice,
    format: clip_core::export::ExportFormat,
    out: &Path,
    overwrite: bool,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    // Refused from the config alone before anything is loaded (a student distilled on images
    // alone would otherwise open its teacher first).
    // Nor may OUT be, or lie inside, the folder the model is read from (--overwrite would
    // replace the model itself).
    if let Some(run) = &choice.run {
        clip_core::export::check_out(out, &[("the run folder", run)])?;
        let cfg = RunDir::open(run)?.config()?;
        clip_core::export::exportable(&cfg, format).with_context(|| format!("exporting --run {}", run.display()))?;
    }
    let m = load(choice, device)?;
    if let Origin::Checkpoint { load, .. } = &m.origin {
        let folders: Vec<(&str, &Path)> = [&load.config_file, &load.weights_file]
            .into_iter()
            .filter_map(|f| f.parent())
            .map(|d| ("the folder the model is read from,", d))
            .collect();
        clip_core::export::check_out(out, &folders)?;
    }
    let e = clip_core::export::export(&m.model, &m.tok, format, out, overwrite)
        .with_context(|| format!("exporting {}", m.flag()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "layout": e.layout,
                "out": out.display().to_string(),
                "tensors": e.tensors,
                "files": e.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                "python": e.python,
            })
        );
    } else {
        println!(
            "exported {} as {} ({} tensors) to {}:",
            m.flag(),
            e.layout,
            e.tensors,
            out.display()
        );
        for f in &e.files {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            println!("  {} ({:.1} MB)", f.display(), size as f64 / 1e6);
        }
        println!(
            "load it in Python:\n{}",
            e.python
                .lines()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        println!(
            "or here: clip-predict image-to-text --model {} …",
            shell_quoted(&out.display().to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A short stable id of some bytes (FNV-1a, 32 bits): enough to tell two preprocessings apart.
fn crc_of(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// `s` as one POSIX shell word: as it is when it has only safe characters, else in single quotes
/// (a `'` inside written `'\''`), so the printed command can be pasted whatever the folder's name.
fn shell_quoted(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_printed_folder_is_one_shell_word() {
        use super::shell_quoted as q;
        assert_eq!(q("runs/exp-1"), "runs/exp-1");
        assert_eq!(q("my exports/it's"), "'my exports/it'\\''s'");
        assert_eq!(q("$(rm -rf ~)"), "'$(rm -rf ~)'");
        assert_eq!(q(""), "''");
    }
}
