//! Stage 2 — batch: can the data feed the model?
//!
//! Loads a dataset (the demo set by default), checks every row and decodes every image, splits it
//! by image, tokenises the captions, builds one batch and checks its tensors, then runs the
//! untrained model on that batch and prints the image–caption similarity matrix. Everything that
//! could stop a training run hours in (a missing file, a corrupt image, captions the tokenizer
//! cannot read) is found here, in seconds.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use clip_cli::fmt_count;
use clip_cli::{DataArgs, Report};
use clip_core::data::{Batch, Dataset, ImageStore, LoadOptions, Loader, Split, StoreMode, TextTokenizer, UnkReport};
use clip_core::prepare::{self, DataSource, TokenizerOrigin};
use clip_core::{device, ClipConfig, ClipModel};
use unicode_width::UnicodeWidthChar;

/// Unknown tokens above this share of caption tokens fail the gate.
const MAX_UNKNOWN_SHARE: f64 = 0.01;
/// Display columns of a caption in the similarity matrix.
const LABEL_COLUMNS: usize = 16;

#[derive(Parser)]
#[command(about = "Stage 2 — load the data, check every row and image, build one batch and run the model on it.")]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Pairs in the checked batch [default: the config's train.batch_size].
    #[arg(long)]
    batch_size: Option<usize>,
}

/// Batches alive at once while training: the one in use, the ones prefetched (up to 4 when
/// images are decoded per batch) and the one being built.
const BATCHES_IN_FLIGHT: usize = 6;

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(2, "batch");
    let json = args.model.json.clone();
    println!("stage 2 — batch: can the data feed the model?\n");
    match check(&args, &mut report) {
        Ok(()) => {}
        // A step that cannot go on is a failed check, so the report still says what went wrong.
        Err(e) => {
            report.check("run", false, format!("{e:#}"));
        }
    }
    report.finish(json.as_deref())
}

fn check(args: &Args, report: &mut Report) -> Result<()> {
    let Some((cfg, dev)) = config_and_device(args, report) else {
        return Ok(());
    };
    let source = args.data.source();
    let Some((ds, store)) = load(&source, &cfg, report)? else {
        return Ok(());
    };
    let resident_images = store.bytes();
    let split = split(&ds, &cfg, report);
    let tok = tokenizer(&source, &ds, &split, &cfg, report)?;

    println!("\nbatch: the first training pairs, as one training step will see them");
    let loader = Loader::new(&ds, Arc::new(store), &tok, &cfg, &dev)?;
    let b = args.batch_size.unwrap_or(cfg.train.batch_size).min(split.train.len());
    if !report.check(
        "batch size",
        b >= 2,
        format!("{b} pairs (a contrastive loss compares each pair with the others, so it needs at least 2)"),
    ) {
        return Ok(());
    }
    let batch = loader.batch(&split.train[..b])?;
    check_images(&batch, &cfg, report)?;
    check_tokens(&batch, &tok, &cfg, report)?;
    untrained_model(&ds, &batch, &cfg, &dev, resident_images, report)
}

/// What the config and device are is information; that they load is the check, and only fails
/// here, naming the file and the problem, when they do not.
fn config_and_device(args: &Args, report: &mut Report) -> Option<(ClipConfig, Device)> {
    let cfg = match args.model.load_config() {
        Ok(c) => c,
        Err(e) => {
            report.check("config", false, format!("{e:#}"));
            return None;
        }
    };
    let dev = match args.model.device() {
        Ok(d) => d,
        Err(e) => {
            report.check("device", false, format!("{e:#}"));
            return None;
        }
    };
    report.info(
        "config",
        format!(
            "{} on {}: {}×{} images, captions of up to {} tokens",
            cfg.name,
            device::describe(&dev),
            cfg.image.image_size,
            cfg.image.image_size,
            cfg.max_tokens()
        ),
    );
    report.metric("config", &cfg.name);
    Some((cfg, dev))
}

/// The untrained model on the batch (evaluation mode): its embeddings' shapes and the B×B
/// similarity matrix, with the memory a training run will need.
fn untrained_model(
    ds: &Dataset,
    batch: &Batch,
    cfg: &ClipConfig,
    dev: &Device,
    resident_images: usize,
    report: &mut Report,
) -> Result<()> {
    println!("\nmodel: the untrained model on this batch (evaluation mode)");
    let b = batch.pairs.len();
    let t = Instant::now();
    let model = ClipModel::new(cfg, dev)?;
    memory(cfg, model.params.total_params(), resident_images, report);
    let e = model.forward(&batch.images, &batch.input_ids, &batch.attention_mask, false)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    report.metric("forward_ms", ms);
    let want = [b, cfg.projection_dim];
    report.check(
        "forward",
        e.image.dims() == want && e.text.dims() == want,
        format!(
            "embeddings: image {:?}, text {:?}, expected {want:?} each; {ms:.0} ms to build and run",
            e.image.dims(),
            e.text.dims()
        ),
    );
    let sim = clip_core::embed::cosine_similarity(&e.image, &e.text)?.to_vec2::<f32>()?;
    let captions: Vec<&str> = batch.pairs.iter().map(|&p| ds.pairs[p].caption.as_str()).collect();
    print_similarity(&sim, &captions);
    let finite = sim.iter().flatten().all(|v| v.is_finite());
    report.check(
        "similarity",
        finite,
        if finite {
            format!("all {b}×{b} cosine similarities are finite")
        } else {
            "NaN or Inf in the similarities: the model or the batch is broken".into()
        },
    );
    report.metric("similarity", &sim);
    Ok(())
}

/// Loads and checks the rows, then decodes every image, with the steps training uses
/// ([`clip_core::prepare::load`]). Bad rows are always collected (not failed on at the first) so
/// they can all be listed. `None` when nothing is left to check.
fn load(source: &DataSource, cfg: &ClipConfig, report: &mut Report) -> Result<Option<(Dataset, ImageStore)>> {
    println!("\ndataset: {}", source.path().display());
    println!("  every row is checked and every image decoded now, so a bad file stops this step, not a training run");
    let opts = LoadOptions {
        skip_bad: true,
        ..source.load_options()
    };
    // Streaming training checks nothing up front: this stage decodes every image once anyway.
    let mode = match source.store_mode() {
        StoreMode::Stream => StoreMode::Memory,
        m => m,
    };
    let t = Instant::now();
    let mut ds = match Dataset::load(&source.path(), &opts) {
        Ok(ds) => ds,
        Err(e) => {
            report.check("rows", false, format!("{e:#}"));
            return Ok(None);
        }
    };
    report.metric("load_seconds", t.elapsed().as_secs_f64());
    println!("  {}", ds.source);
    let t = Instant::now();
    let (store, image_bad) = match prepare::decode(&mut ds, cfg, &mode, true, &clip_cli::progress::Bar::new()) {
        Ok(decoded) => decoded,
        Err(e) => {
            report.check("images", false, format!("{e:#}"));
            return Ok(None);
        }
    };
    report.metric("decode_seconds", t.elapsed().as_secs_f64());
    let image_bad: Vec<String> = image_bad.iter().map(|b| b.to_string()).collect();
    check_rows(&ds, &image_bad, source.skip_bad, report);
    check_decoded(&ds, &store, &image_bad, source.skip_bad, cfg, report);
    summarise(&ds, report);
    Ok(Some((ds, store)))
}

/// The rows: every bad one (not an image that failed) named, or left out with --skip-bad.
fn check_rows(ds: &Dataset, image_bad: &[String], skip_bad: bool, report: &mut Report) {
    report.metric("bad_rows", ds.bad.iter().map(|b| b.to_string()).collect::<Vec<_>>());
    let row_bad: Vec<String> = ds
        .bad
        .iter()
        .map(|b| b.to_string())
        .filter(|b| !image_bad.contains(b))
        .collect();
    let detail = match row_bad.len() {
        0 => format!("{} pairs, no bad rows", ds.pairs.len()),
        n if skip_bad => format!("{} left out (--skip-bad), {} usable", rows(n), ds.pairs.len()),
        n => format!(
            "{}: {} — fix them, or leave them out with --skip-bad",
            rows(n),
            first(&row_bad)
        ),
    };
    report.check("rows", row_bad.is_empty() || skip_bad, detail);
}

/// The images: every one decoded (or found in the image cache), or named.
fn check_decoded(
    ds: &Dataset,
    store: &ImageStore,
    image_bad: &[String],
    skip_bad: bool,
    cfg: &ClipConfig,
    report: &mut Report,
) {
    let s = cfg.image.image_size;
    let n = ds.images.len();
    let held = match store.cache() {
        Some(c) if c.built == 0 && c.dropped == 0 => "image cache hit".to_string(),
        Some(_) => "image cache updated".to_string(),
        None => format!("{} KiB in memory", fmt_count(store.bytes() / 1024)),
    };
    let mut detail = format!("{} of {n} decoded to {s}×{s} RGB ({held})", n - image_bad.len());
    if !image_bad.is_empty() {
        detail.push_str(&if skip_bad {
            "; the captions of the others are left out (--skip-bad)".to_string()
        } else {
            format!(
                "; {} — replace them, or leave their captions out with --skip-bad",
                first(image_bad)
            )
        });
    }
    report.check("images", image_bad.is_empty() || skip_bad, detail);
    match store.cache() {
        Some(c) => {
            println!("  image cache: {c}");
            report.metric(
                "image_cache",
                serde_json::json!({ "hits": c.hits, "built": c.built, "dropped": c.dropped, "bytes_on_disk": c.bytes_on_disk, "manifest": c.manifest }),
            );
        }
        None => println!("  image cache: off, every start decodes every image again"),
    }
    if let Some(note) = store.note() {
        println!("  note: {note}");
    }
}

/// The bad rows listed, and the dataset in numbers: pairs, images, captions per image, classes.
fn summarise(ds: &Dataset, report: &mut Report) {
    if !ds.bad.is_empty() {
        println!("  bad rows and images:");
        println!("    {}", clip_core::listing::first_n(&ds.bad, 10, "\n    "));
    }
    let per_image: Vec<usize> = ds.captions_per_image().into_iter().filter(|&n| n > 0).collect();
    let (min, mean, max) = stats(&per_image);
    println!(
        "  {} pairs of {} images; captions per image: min {min}, mean {mean:.1}, max {max}",
        ds.pairs.len(),
        per_image.len()
    );
    if !ds.labels.is_empty() {
        println!("  {} classes: {}", ds.labels.len(), preview(&ds.labels, 8));
    }
    let (mode, allows) = if ds.captionless() {
        (
            "images only",
            "no captions: these images can only distil an image tower from a teacher (stage4-train --teacher RUN|MODEL, with contrastive = 0.0 and affinity = 0.0 under [distill]); training a CLIP needs captions (a captions file, or class folders)",
        )
    } else if !ds.labels.is_empty() {
        (
            "class folders",
            "captions from the templates: CLIP training with zero-shot accuracy per class, fine-tuning, distillation of both towers",
        )
    } else {
        (
            "image-caption pairs",
            "CLIP training, fine-tuning, distillation of both towers",
        )
    };
    println!("  mode: {mode} — {allows}");
    report.metric("mode", mode);
    report.metric("pairs", ds.pairs.len());
    report.metric("images", per_image.len());
    report.metric(
        "captions_per_image",
        serde_json::json!({ "min": min, "mean": mean, "max": max }),
    );
}

fn split(ds: &Dataset, cfg: &ClipConfig, report: &mut Report) -> Split {
    println!("\nsplit: whole images are held out, so validation never sees a caption of a training image");
    let s = ds.split(cfg.data.val_fraction, cfg.seed);
    let images = |pairs: &[usize]| {
        pairs
            .iter()
            .map(|&p| ds.pairs[p].image)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (train_images, val_images) = (images(&s.train), images(&s.val));
    let apart = s.is_fallback() || train_images.is_disjoint(&val_images);
    report.check(
        "split",
        apart,
        format!(
            "{} training pairs ({} images), {} validation pairs ({} images), seed {}",
            s.train.len(),
            train_images.len(),
            s.val.len(),
            val_images.len(),
            cfg.seed
        ),
    );
    if let Some(note) = &s.note {
        println!("         note: {note}");
    }
    report.metric(
        "split",
        serde_json::json!({ "train": s.train.len(), "val": s.val.len(), "note": s.note }),
    );
    s
}

/// The tokenizer training will use ([`clip_core::prepare::tokenizer`]): its vocabulary fits the
/// model, and how many caption tokens it cannot read.
fn tokenizer(
    source: &DataSource,
    ds: &Dataset,
    split: &Split,
    cfg: &ClipConfig,
    report: &mut Report,
) -> Result<TextTokenizer> {
    println!("\ntokenizer: captions become ids; text the tokenizer has no entry for becomes [UNK], which the model cannot learn from");
    let train_captions = ds.captions_of(&split.train);
    let chosen = prepare::tokenizer(cfg, source.tokenizer.as_deref(), &train_captions)?;
    let tok = chosen.tokenizer;
    let what = match &chosen.origin {
        TokenizerOrigin::File(path) => format!("{} (loaded)", path.display()),
        TokenizerOrigin::Pretrained { model, file } => format!("{model}'s own tokenizer ({})", file.display()),
        TokenizerOrigin::Trained(n) => format!("WordPiece trained on the {n} training captions"),
    };
    let fits = tok.check_fits(cfg);
    report.check(
        "vocabulary",
        fits.is_ok(),
        match &fits {
            Ok(()) => format!(
                "{what}: {} entries, within text.vocab_size {}",
                fmt_count(tok.vocab_size()),
                fmt_count(cfg.text.vocab_size)
            ),
            Err(e) => format!("{what}: {e:#}"),
        },
    );
    report.metric("vocab_size", tok.vocab_size());
    let lengths = ds
        .pairs
        .iter()
        .map(|p| tok.encode(&p.caption).map(|ids| ids.len()))
        .collect::<Result<Vec<_>>>()?;
    let (min, mean, max) = stats(&lengths);
    println!(
        "  caption length in tokens, with the start and end tokens: min {min}, mean {mean:.1}, max {max} (limit {})",
        cfg.max_tokens()
    );
    report.metric(
        "caption_tokens",
        serde_json::json!({ "min": min, "mean": mean, "max": max }),
    );
    unknown_tokens(&tok, &chosen.origin, ds, split, cfg, report)?;
    Ok(tok)
}

/// Unknown tokens: a tokenizer trained here knows every training caption; the validation
/// captions may use text the training captions never do, which no tokenizer trained on them could
/// know, so they are shown but not gated. A loaded tokenizer is judged on every caption.
fn unknown_tokens(
    tok: &TextTokenizer,
    origin: &TokenizerOrigin,
    ds: &Dataset,
    split: &Split,
    cfg: &ClipConfig,
    report: &mut Report,
) -> Result<()> {
    let trained = matches!(origin, TokenizerOrigin::Trained(_));
    let gated = if trained {
        ds.captions_of(&split.train)
    } else {
        ds.captions()
    };
    let r = tok.unknown_report(&gated)?;
    let whose = if trained { "training captions" } else { "captions" };
    let ok = r.share() <= MAX_UNKNOWN_SHARE;
    let measured = format!(
        "{} of {} tokens of the {whose} are [UNK] ({:.2} %, limit {:.0} %)",
        r.unknown_tokens,
        fmt_count(r.total_tokens),
        100.0 * r.share(),
        100.0 * MAX_UNKNOWN_SHARE
    );
    let detail = if ok && r.unknown_tokens == 0 {
        measured
    } else if ok {
        format!("{measured}; unknown: {}", r.examples(12))
    } else {
        let fix = match origin {
            TokenizerOrigin::Trained(_) => "shorten the long words, or raise text.vocab_size".to_string(),
            TokenizerOrigin::Pretrained { model, .. } => format!(
                "the pretrained text model {model} cannot read these captions; pick one whose vocabulary covers them, e.g. text.pretrained = \"distilbert/distilbert-base-multilingual-cased\" (the simple-clip-pretrained-zh preset) or \"google-bert/bert-base-chinese\" for Chinese, or train from scratch with a tokenizer trained on your captions (the simple-clip preset)"
            ),
            TokenizerOrigin::File(_) => {
                "train one on your captions (leave out --tokenizer) or pick a tokenizer that covers them".to_string()
            }
        };
        format!("this tokenizer has no entry for {}: {fix}; {measured}", r.examples(12))
    };
    report.check("unknown tokens", ok, detail);
    report.metric("unknown_share", r.share());
    report.metric("unknown", &r.unknown);
    if trained && !split.is_fallback() {
        let v = tok.unknown_report(&ds.captions_of(&split.val))?;
        print_validation_unknowns(&v);
        report.metric("val_unknown_share", v.share());
    }
    if r.truncated > 0 {
        println!(
            "  {} captions are longer than {} tokens and will be cut (raise data.max_length to keep them whole)",
            r.truncated,
            cfg.max_tokens()
        );
    }
    Ok(())
}

fn print_validation_unknowns(v: &UnkReport) {
    if v.unknown_tokens == 0 {
        println!("  validation captions: no [UNK]");
    } else {
        println!(
            "  validation captions: {:.1} % [UNK], text no training caption uses: {}",
            100.0 * v.share(),
            v.examples(12)
        );
    }
}

/// The image tensor: its shape, and values in the range normalised pixels can take.
fn check_images(batch: &Batch, cfg: &ClipConfig, report: &mut Report) -> Result<()> {
    let b = batch.pairs.len();
    let s = cfg.image.image_size;
    let (lo, hi) = clip_core::data::Preprocess::from_config(cfg).normalised_range();
    let values = batch.images.flatten_all()?.to_vec1::<f32>()?;
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, z), &v| (a.min(v), z.max(v)));
    let in_range = min >= lo - 1e-4 && max <= hi + 1e-4;
    let shape_ok = batch.images.dims() == [b, 3, s, s];
    report.check(
        "image tensor",
        shape_ok && in_range && min < max,
        format!(
            "{:?} f32, values in [{min:.3}, {max:.3}]: pixels normalised with image.mean / image.std lie in [{lo:.3}, {hi:.3}]{}",
            batch.images.dims(),
            if min < max {
                ""
            } else {
                "; every value is the same, so the images carry no signal"
            }
        ),
    );
    Ok(())
}

/// The token tensors: shapes, [CLS] first, and a mask that hides exactly the padding.
fn check_tokens(batch: &Batch, tok: &TextTokenizer, cfg: &ClipConfig, report: &mut Report) -> Result<()> {
    let b = batch.pairs.len();
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let mask = batch.attention_mask.to_vec2::<u32>()?;
    let l = batch.input_ids.dim(1)?;
    let shapes_ok = batch.input_ids.dims() == [b, l] && batch.attention_mask.dims() == [b, l] && l <= cfg.max_tokens();
    report.check(
        "token tensors",
        shapes_ok,
        format!(
            "input_ids and attention_mask {:?} u32, padded to the longest caption ({l} ≤ {})",
            batch.input_ids.dims(),
            cfg.max_tokens()
        ),
    );
    report.metric("batch", serde_json::json!({ "size": b, "tokens": l }));
    let cls_first = ids.iter().all(|row| row.first() == Some(&tok.cls_id()));
    let name = |id: u32| tok.token(id).unwrap_or_else(|| format!("id {id}"));
    let (start, end) = (name(tok.cls_id()), name(tok.sep_id()));
    report.check("[CLS] first", cls_first, cls_detail(cfg, &start, &end));
    // Mask 1 up to and including [SEP], then 0 exactly where the ids are [PAD].
    let bad_rows: Vec<usize> = (0..b)
        .filter(|&k| {
            let Some(end) = ids[k].iter().position(|&t| t == tok.sep_id()) else {
                return true;
            };
            (0..l).any(|j| (mask[k][j] == 0) != (j > end) || (j > end && ids[k][j] != tok.pad_id()))
        })
        .collect();
    report.check(
        "mask",
        bad_rows.is_empty(),
        if bad_rows.is_empty() {
            format!(
                "1 on every token up to {end}, 0 on the padding after it ({} padded positions)",
                mask.iter().flatten().filter(|&&m| m == 0).count()
            )
        } else {
            format!(
                "rows {bad_rows:?} have padding the mask does not hide (or no {end}): attention would read the padding"
            )
        },
    );
    Ok(())
}

/// Why every row must start with the `start` token, as the config's text pooling reads it.
fn cls_detail(cfg: &ClipConfig, start: &str, end: &str) -> String {
    match cfg.text.pooling {
        // A CLIP text transformer reads the caption at its end-of-text token (causal mask).
        clip_core::config::Pooling::Eot => {
            format!("every row starts with {start}; the text tower reads the caption at its first {end}")
        }
        clip_core::config::Pooling::Cls => {
            format!("the text tower reads the caption from the {start} position, so every row must start with it")
        }
        clip_core::config::Pooling::Mean => {
            format!("every row starts with {start}, as the text tower was trained to read it")
        }
    }
}

/// The B×B matrix: row k is the image of pair k, column k its caption, so training should make
/// the diagonal stand out. Untrained, it does not.
fn print_similarity(sim: &[Vec<f32>], captions: &[&str]) {
    println!("  cosine similarity: row k is the image of pair k, column k its caption; training should make the diagonal stand out");
    let pad = " ".repeat(LABEL_COLUMNS + 6);
    println!("{pad}{}", (0..sim.len()).map(|j| format!("{j:>6}")).collect::<String>());
    for (k, row) in sim.iter().enumerate() {
        println!(
            "  {k:>2} {} {}",
            fit_width(captions[k], LABEL_COLUMNS),
            row.iter().map(|v| format!("{v:>6.2}")).collect::<String>()
        );
    }
}

/// Cuts `text` to `columns` display columns (CJK characters take 2) with an ellipsis, and pads it.
fn fit_width(text: &str, columns: usize) -> String {
    let width = |c: char| c.width().unwrap_or(0);
    let total: usize = text.chars().map(width).sum();
    let mut out = String::new();
    let mut used = 0;
    if total <= columns {
        out.push_str(text);
        used = total;
    } else {
        for c in text.chars() {
            if used + width(c) > columns - 1 {
                break;
            }
            out.push(c);
            used += width(c);
        }
        out.push('…');
        used += 1;
    }
    out.push_str(&" ".repeat(columns.saturating_sub(used)));
    out
}

/// The first few problems, for a check's one-line detail (all are listed below the checks).
fn first(problems: &[String]) -> String {
    clip_core::listing::first_n(problems, 3, "; ")
}

fn rows(n: usize) -> String {
    format!("{n} bad row{}", if n == 1 { "" } else { "s" })
}

fn stats(v: &[usize]) -> (usize, f64, usize) {
    let min = v.iter().copied().min().unwrap_or(0);
    let max = v.iter().copied().max().unwrap_or(0);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<usize>() as f64 / v.len() as f64
    };
    (min, mean, max)
}

fn preview(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        s.push_str(", …");
    }
    s
}

/// Prints (and reports) the memory a training run on this data will need, before activations:
/// the images held in memory (none with the image cache: the OS pages it), the batches in
/// flight, and the weights with their gradients and AdamW's two moments (4 × 4 bytes each).
fn memory(cfg: &ClipConfig, params: usize, resident_images: usize, report: &mut Report) {
    let s = cfg.image.image_size;
    let batches = BATCHES_IN_FLIGHT * cfg.train.batch_size * 3 * s * s * 4;
    let weights = params * 4 * 4;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let total = resident_images + batches + weights;
    println!(
        "  memory for training: about {:.0} MiB plus activations (images {:.0} MiB{}, batches in flight {:.0} MiB, weights + gradients + AdamW {:.0} MiB)",
        mib(total),
        mib(resident_images),
        if resident_images == 0 { ", paged from the image cache" } else { " in memory" },
        mib(batches),
        mib(weights)
    );
    report.metric(
        "memory_mib",
        serde_json::json!({ "total": mib(total), "images": mib(resident_images), "batches": mib(batches), "weights": mib(weights) }),
    );
}
