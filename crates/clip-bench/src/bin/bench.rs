//! Benchmarks printed as JSON lines (run through `cargo xtask bench`):
//!
//!     bench train  [--preset tiny | --config FILE] [--batch-size B] [--steps N] [--seq-len L] [--precision fp32|bf16]
//!                  [--micro-batch M]
//!     bench infer  [the same flags as train] [--pretrained REPO|DIR]
//!     bench search [--n 1000000] [--dim 256] [--queries 20] [--top 10]
//!     bench index  [--images 500] [--preset tiny] [--precision fp32|bf16]
//!
//! Every line of `train`, `infer` and `index` records the GEMM precision it ran in
//! (`"precision"`: the flag, else the config's `train.precision`).
//!
//! `train` times full training steps (forward, backward, AdamW) on random data, like the PyTorch
//! reference's `bench`; `infer` times the image and the text tower (each with its projection
//! head) in evaluation mode on the same batches, like the reference's `bench-infer`; `search` times text → image queries over a synthetic index; `index`
//! times building an image index (decode + embed) of generated photos.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use clip_core::data::Batch;
use clip_core::index::top_k;
use clip_core::optim::AdamW;
use clip_core::{ClipConfig, ClipModel};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What `train` and `infer` measure: a model, a batch shape, and how many steps.
#[derive(clap::Args)]
struct ModelBench {
    #[arg(long)]
    preset: Option<String>,
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// A pretrained CLIP whose architecture to build (its config alone is read: the weights stay
    /// random, which does not change the speed).
    #[arg(long)]
    pretrained: Option<String>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    precision: clip_cli::PrecisionArg,
    /// `train`: each batch through the towers M pairs at a time (the gradient cache,
    /// `clip_core::train::grad_cache`), as `stage4-train --micro-batch` runs it; then the phases
    /// are not timed apart.
    #[arg(long, value_name = "M", default_value_t = 0)]
    micro_batch: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time training steps (forward, backward, AdamW) on random batches: one JSON line.
    Train(ModelBench),
    /// Time embedding images and captions without a graph: one JSON line.
    Infer(ModelBench),
    /// Time indexing generated 320×240 photos with a preset model (`clip-predict index`'s work).
    Index {
        #[arg(long, default_value_t = 500)]
        images: usize,
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[command(flatten)]
        precision: clip_cli::PrecisionArg,
    },
    /// Time exact top-k search over N random unit embeddings.
    Search {
        #[arg(long, default_value_t = 1_000_000)]
        n: usize,
        #[arg(long, default_value_t = 256)]
        dim: usize,
        #[arg(long, default_value_t = 20)]
        queries: usize,
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

/// A deterministic pseudo-random f32 stream (candle's CPU RNG cannot be seeded).
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// N(0, 1) values from [`pseudo`] (Box–Muller).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let u = pseudo(n + 1, seed);
    (0..n)
        .map(|i| {
            let (u1, u2) = ((u[i] * 0.5 + 0.5).max(1e-7), u[i + 1] * 0.5 + 0.5);
            let r = (-2.0 * u1.ln()).sqrt();
            if i % 2 == 0 {
                r * (std::f32::consts::TAU * u2).cos()
            } else {
                r * (std::f32::consts::TAU * u2).sin()
            }
        })
        .collect()
}

/// A model built from [`ModelBench`], with the batch shape both benchmarks use.
struct Setup {
    cfg: ClipConfig,
    dev: Device,
    model: ClipModel,
    /// Batch size, caption tokens, image side.
    b: usize,
    l: usize,
    s: usize,
}

impl Setup {
    fn new(a: &ModelBench) -> Result<Self> {
        let mut cfg = ClipConfig::resolve(a.config.as_deref(), a.preset.as_deref())?;
        if let Some(p) = &a.pretrained {
            cfg.pretrained = Some(p.clone());
        }
        clip_core::pretrained::apply_configs(&mut cfg, &clip_core::hub::Hub::from_env())?;
        let dev = clip_core::device::parse_device(&a.device)?;
        a.precision.apply(&mut cfg, &dev)?;
        let b = a.batch_size.unwrap_or(cfg.train.batch_size);
        let l = a.seq_len.min(cfg.max_tokens());
        let s = cfg.image.image_size;
        let model = ClipModel::new(&cfg, &dev)?;
        Ok(Self {
            cfg,
            dev,
            model,
            b,
            l,
            s,
        })
    }

    /// The JSON line of a run: what it ran (model, shapes, threads) and its peak memory, then `fields`.
    fn line(&self, a: &ModelBench, fields: serde_json::Value) -> serde_json::Value {
        let mut line = json!({
            "impl": "clipmine", "config": self.cfg.name, "device": clip_core::device::describe(&self.dev),
            "batch_size": self.b, "image_size": self.s, "seq_len": self.l, "steps": a.steps, "warmup": a.warmup,
            "threads": rayon::current_num_threads(), "peak_rss_mb": clip_bench::peak_rss_mib(),
            "composed": clip_core::nn::dispatch::composed_forced(),
            "precision": self.cfg.train.precision.name(),
        });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        line
    }

    /// The two batches taken in turn. As the reference's `random_batch`: N(0, 1) pixels, token
    /// ids uniform in [4, vocab) after a [CLS]-like first token — so the losses of the two sides
    /// are comparable, not only their speed.
    fn batches(&self) -> Result<[Batch; 2]> {
        Ok([self.batch(1)?, self.batch(2)?])
    }

    fn batch(&self, seed: u64) -> Result<Batch> {
        let (b, l, s, dev, vocab) = (self.b, self.l, self.s, &self.dev, self.cfg.text.vocab_size);
        let cls = if vocab < 102 { 2 } else { 101 };
        let ids: Vec<u32> = pseudo(b * l, seed + 10)
            .iter()
            .enumerate()
            .map(|(i, u)| {
                if i % l == 0 {
                    cls
                } else {
                    4 + ((u * 0.5 + 0.5) * (vocab - 4) as f32) as u32 % (vocab as u32 - 4)
                }
            })
            .collect();
        Ok(Batch {
            images: Tensor::from_vec(normal(b * 3 * s * s, seed), (b, 3, s, s), dev)?,
            input_ids: Tensor::from_vec(ids, (b, l), dev)?,
            attention_mask: Tensor::ones((b, l), DType::U32, dev)?,
            pairs: (0..b).collect(),
            positives: Tensor::eye(b, DType::F32, dev)?,
            image_features: None,
            text_features: None,
            global: None,
        })
    }
}

fn main() -> Result<()> {
    // As the programs run: freed memory reused (clip_cli::memory).
    clip_cli::memory::keep_freed_memory();
    match Cli::parse().cmd {
        Cmd::Train(a) => train(&a),
        Cmd::Infer(a) => infer(&a),
        Cmd::Index {
            images,
            preset,
            precision,
        } => index(images, &preset, &precision),
        Cmd::Search { n, dim, queries, top } => search(n, dim, queries, top),
    }
}

/// `bench train`: full training steps, timed by phase (or whole through the gradient cache).
fn train(a: &ModelBench) -> Result<()> {
    let x = Setup::new(a)?;
    // A big batch through the gradient cache takes one batch, twice: the inputs of a
    // second one would weigh on its peak memory as much as the method does.
    let batches = match a.micro_batch {
        0 => x.batches()?,
        _ => {
            let b = x.batch(1)?;
            [b.clone(), b]
        }
    };
    let (model, batches) = (&x.model, batches);
    let mut opt = AdamW::new(&model.params, &x.cfg.train)?;
    let mut times = vec![];
    let mut losses = vec![];
    // The same work as `train_step`, timed by phase (as the PyTorch reference reports it).
    let (mut t_fwd, mut t_bwd, mut t_opt) = (0.0, 0.0, 0.0);
    for step in 0..a.warmup + a.steps {
        let batch = &batches[step % 2];
        if a.micro_batch > 0 {
            let t = Instant::now();
            let out = clip_core::train::train_step_objective(
                model,
                &mut opt,
                std::slice::from_ref(batch),
                0.0,
                a.micro_batch,
                &clip_core::train::Contrastive,
            )?;
            if step >= a.warmup {
                times.push(t.elapsed().as_secs_f64());
                losses.push(out.loss);
            }
            continue;
        }
        let (t, t1, t2, t3, value) = timed_step(model, &mut opt, batch, step)?;
        if step >= a.warmup {
            times.push((t3 - t).as_secs_f64());
            losses.push(value);
            t_fwd += (t1 - t).as_secs_f64();
            t_bwd += (t2 - t1).as_secs_f64();
            t_opt += (t3 - t2).as_secs_f64();
        }
    }
    let total = t_fwd + t_bwd + t_opt;
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let share = |t: f64| (a.micro_batch == 0).then_some(t / total);
    let line = x.line(
        a,
        json!({
            "bench": "train", "params": model.params.total_params(), "loss": x.cfg.loss.to_string(),
            "ms_per_step": mean * 1e3, "pairs_per_s": x.b as f64 / mean, "losses": losses,
            "forward_share": share(t_fwd), "backward_share": share(t_bwd), "optimizer_share": share(t_opt),
            "micro_batch": a.micro_batch,
        }),
    );
    println!("{line}");
    Ok(())
}

/// One training step as `train_step` runs it, on a worker of the compute pool (see
/// `on_compute_pool`): its start, the ends of the forward, backward and optimiser phases, and
/// the loss.
fn timed_step(
    model: &ClipModel,
    opt: &mut AdamW,
    batch: &Batch,
    step: usize,
) -> Result<(Instant, Instant, Instant, Instant, f64)> {
    clip_core::nn::on_compute_pool(|| -> Result<_> {
        let t = Instant::now();
        model.reseed_dropout(step as u64);
        let e = model.forward(&batch.images, &batch.input_ids, &batch.attention_mask, true)?;
        let loss = model.loss(&e, Some(&batch.positives))?;
        let value = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = opt.grads_by_name(&loss.backward()?);
        let t2 = Instant::now();
        opt.step(&grads)?;
        Ok((t, t1, t2, Instant::now(), value))
    })
}

/// `bench infer`: each tower with its head, in evaluation mode.
fn infer(a: &ModelBench) -> Result<()> {
    let x = Setup::new(a)?;
    let (model, batches) = (&x.model, x.batches()?);
    // Each tower with its head, in evaluation mode, timed apart (building an index runs
    // the image side, a query the text side); reading the embeddings back makes sure the
    // work is done on any device.
    // All in one `no_grad` scope, as an index or an evaluation runs (and as the reference
    // runs under `torch.inference_mode`): weights prepared in warm-up are reused.
    let (mut t_image, mut t_text) = (0.0, 0.0);
    clip_core::nn::no_grad(|| -> Result<()> {
        for step in 0..a.warmup + a.steps {
            let batch = &batches[step % 2];
            let t = Instant::now();
            model.embed_images(&batch.images)?.to_vec2::<f32>()?;
            let t1 = Instant::now();
            model
                .embed_texts(&batch.input_ids, &batch.attention_mask)?
                .to_vec2::<f32>()?;
            let t2 = Instant::now();
            if step >= a.warmup {
                t_image += (t1 - t).as_secs_f64();
                t_text += (t2 - t1).as_secs_f64();
            }
        }
        Ok(())
    })?;
    let (n, b) = (a.steps.max(1) as f64, x.b as f64);
    let line = x.line(
        a,
        json!({
            "bench": "infer", "images_per_s": b * n / t_image, "captions_per_s": b * n / t_text,
            "ms_per_image_batch": t_image / n * 1e3, "ms_per_text_batch": t_text / n * 1e3,
        }),
    );
    println!("{line}");
    Ok(())
}

/// `bench index`: building an image index of `images` generated photos with `preset`.
fn index(images: usize, preset: &str, precision: &clip_cli::PrecisionArg) -> Result<()> {
    let mut cfg = ClipConfig::preset(preset)?;
    precision.apply(&mut cfg, &Device::Cpu)?;
    let model = ClipModel::new(&cfg, &Device::Cpu)?;
    let dir = std::env::temp_dir().join(format!("clipmine-bench-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let noise = pseudo(320 * 240 * 3, 3);
    for i in 0..images {
        let img = image::RgbImage::from_fn(320, 240, |x, y| {
            let k = ((y * 320 + x) * 3) as usize;
            let v = |c: usize| ((noise[(k + c + i * 7) % noise.len()] * 0.5 + 0.5) * 255.0) as u8;
            image::Rgb([v(0), v(1), v(2)])
        });
        img.save(dir.join(format!("{i:05}.jpg")))?;
    }
    let (index, stats) =
        clip_core::index::ImageIndex::update(None, &model, "bench", &dir, 64, &Default::default(), |_| {})?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "impl": "clipmine", "bench": "index", "config": cfg.name, "images": index.entries.len(),
            "image_size": "320x240 jpeg", "seconds": stats.seconds, "images_per_s": stats.images_per_second,
            "precision": cfg.train.precision.name(),
        })
    );
    Ok(())
}

/// `bench search`: exact top-`top` queries over `n` random unit embeddings of `dim`.
fn search(n: usize, dim: usize, queries: usize, top: usize) -> Result<()> {
    let t = Instant::now();
    let m = Tensor::from_vec(pseudo(n * dim, 7), (n, dim), &Device::Cpu)?;
    let m = clip_core::embed::l2_normalize(&m)?;
    let build = t.elapsed().as_secs_f64();
    let mut times = vec![];
    for q in 0..queries {
        let query =
            clip_core::embed::l2_normalize(&Tensor::from_vec(pseudo(dim, 100 + q as u64), (1, dim), &Device::Cpu)?)?
                .squeeze(0)?;
        let t = Instant::now();
        let hits = top_k(&m, &query, top)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(hits.len(), top.min(n));
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{}",
        json!({
            "impl": "clipmine", "bench": "search", "embeddings": n, "dim": dim, "top": top, "queries": queries,
            "median_ms": times[times.len() / 2], "max_ms": times[times.len() - 1], "setup_s": build,
        })
    );
    Ok(())
}
