//! Stage 1 — build: does this environment build the model?
//!
//! Builds the CLIP model from a config, reports the environment and the parameters of each part,
//! runs one forward pass on random inputs, and checks the shapes and that every value is finite.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use clip_cli::fmt_count;
use clip_cli::Report;
use clip_core::device;
use clip_core::params::Group;
use clip_core::{ClipConfig, ClipModel};

#[derive(Parser)]
#[command(about = "Stage 1 — build the model, count its parameters and run a random forward pass.")]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    /// A distillation teacher (a run folder or a pretrained CLIP, as `stage4-train --teacher`):
    /// prints its size beside the student's and what the student inherits from it.
    #[arg(long, value_name = "RUN|MODEL")]
    teacher: Option<String>,
    /// Batch size of the random forward pass.
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
}

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(1, "build");
    let json = args.model.json.as_deref();
    println!("stage 1 — build: does this environment build the model?\n");
    environment(&mut report);
    let Some(cfg) = config(&args.model, &mut report) else {
        return report.finish(json);
    };
    let Some(dev) = device(&args.model, &mut report) else {
        return report.finish(json);
    };
    let mut cfg = cfg;
    if let Some(spec) = &args.teacher {
        cfg.distill.teacher = Some(spec.clone());
    }
    let teacher = match clip_cli::distill::open_teacher(&cfg, &dev, false) {
        Ok(t) => t,
        Err(e) => {
            report.check("teacher", false, format!("{e:#}"));
            return report.finish(json);
        }
    };
    if let Some(t) = &teacher {
        // The teacher's width sizes the student's maps into its space, counted below.
        cfg.distill.teacher_dim = Some(t.model.embed_dim());
    }
    let Some(model) = build(&cfg, &dev, &mut report) else {
        return report.finish(json);
    };
    count_parameters(&model, &mut report);
    if let Some(t) = &teacher {
        inherit(&model, t, &mut report)?;
    }
    // A forward pass on random inputs, in evaluation mode, then in training mode.
    let inputs = RandomInputs::new(&cfg, &dev, args.batch_size.max(2))?;
    for train in [false, true] {
        forward(&model, &inputs, train, &mut report)?;
    }
    // A pretrained CLIP is probed always: its answers on fixed inputs are what the user compares.
    if json.is_some() || cfg.pretrained.is_some() {
        pretrained::probe(&model, &mut report);
    }
    report.finish(json)
}

/// The environment: what candle was built with and where it will run.
fn environment(report: &mut Report) {
    let features = device::compiled_features();
    println!(
        "candle {}; compiled features: {}",
        clip_core::CANDLE_VERSION,
        if features.is_empty() {
            "none (CPU only)".into()
        } else {
            features.join(", ")
        }
    );
    report.metric("candle_version", clip_core::CANDLE_VERSION);
    report.metric("features", &features);
    cpu_bf16(report);
    // The data-parallel world (mpirun, srun) this process is a rank of, if any.
    let world = clip_mpi::describe_world();
    println!("{world}");
    report.metric("world", world);
}

/// What the CPU offers for bf16 and what `--precision bf16` (stages 3 and 4, clip-predict, the
/// benchmarks) would use here, or why it would be refused.
fn cpu_bf16(report: &mut Report) {
    use clip_core::nn::bf16::{bf16_hardware, Bf16Support};
    let detail = clip_core::nn::precision::describe_hardware();
    println!("{detail}");
    let hardware = match bf16_hardware() {
        Bf16Support::Amx => "amx",
        Bf16Support::Avx512Bf16 => "avx512_bf16",
        Bf16Support::None => "none",
    };
    let bf16 = clip_core::nn::precision::bf16_refusal().unwrap_or_else(|| "available".into());
    report.metric(
        "cpu_bf16",
        serde_json::json!({ "hardware": hardware, "precision_bf16": bf16, "detail": detail }),
    );
}

/// The config the flags name (a file, a preset, or `tiny`); `None` when it cannot be read.
fn config(args: &clip_cli::ModelArgs, report: &mut Report) -> Option<ClipConfig> {
    let cfg = match args.load_config() {
        Ok(c) => c,
        Err(e) => {
            report.check("config", false, format!("{e:#}"));
            return None;
        }
    };
    report.check(
        "config",
        true,
        format!(
            "{} (loss {}, {}×{} images, projection {})",
            cfg.name, cfg.loss, cfg.image.image_size, cfg.image.image_size, cfg.projection_dim
        ),
    );
    report.metric("config", &cfg.name);
    // Stage 1 builds and runs the model in fp32; what a config's bf16 would meet is said here.
    report.metric("precision", clip_core::nn::precision().name());
    if cfg.train.precision == clip_core::nn::Precision::Bf16 {
        report.info(
            "precision",
            match clip_core::nn::precision::bf16_refusal() {
                None => "the config asks for bf16 (train.precision): stages 3 and 4 run their GEMMs on AMX tiles; this stage's forward pass runs in fp32".to_string(),
                Some(why) => format!("the config asks for bf16 (train.precision), which stages 3 and 4 will refuse here ({why}): pass them --precision fp32"),
            },
        );
    }
    Some(cfg)
}

/// The device, proven to compute: opening one proves little (a CUDA build with a mismatched
/// driver opens and then computes garbage or fails on the first kernel), so a small product whose
/// exact answer is known is computed on it.
fn device(args: &clip_cli::ModelArgs, report: &mut Report) -> Option<Device> {
    let dev = match args.device() {
        Ok(d) => d,
        Err(e) => {
            report.check("device", false, format!("{e:#}"));
            return None;
        }
    };
    let probe = device_probe(&dev);
    report.check(
        "device",
        probe.is_ok(),
        match &probe {
            Ok(()) => format!(
                "{}: a 64×48 · 48×32 product on it gives the exact result",
                device::describe(&dev)
            ),
            Err(e) => format!("{}: {e:#}", device::describe(&dev)),
        },
    );
    report.metric("device", device::describe(&dev));
    probe.is_ok().then_some(dev)
}

/// The model: every tensor is allocated and initialised (or loaded from pretrained weights) here.
fn build(cfg: &ClipConfig, dev: &Device, report: &mut Report) -> Option<ClipModel> {
    let t = Instant::now();
    let model = match clip_core::pretrained::build(cfg, dev) {
        Ok((m, loaded)) => {
            pretrained::show(&loaded, cfg, report);
            m
        }
        Err(e) => {
            report.check("build", false, format!("{e:#} — check the config's shapes"));
            return None;
        }
    };
    report.metric("build_seconds", t.elapsed().as_secs_f64());
    Some(model)
}

/// The student beside its teacher, and what it would start from (stage 4 does the same on a
/// new run).
fn inherit(model: &ClipModel, teacher: &clip_core::distill::Teacher, report: &mut Report) -> Result<()> {
    let (s, t) = (model.params.total_params(), teacher.params());
    let ratio = if s <= t {
        format!("{:.1}× fewer", t as f64 / s.max(1) as f64)
    } else {
        format!("the student is {:.1}× larger", s as f64 / t.max(1) as f64)
    };
    println!(
        "student vs teacher: {} against {} parameters ({ratio})",
        fmt_count(s),
        fmt_count(t)
    );
    report.metric("teacher_parameters", t);
    if model.config.distill.inherit {
        // Stage 1 has no data, so no tokenizer of the student's own: the token table is
        // taken to differ (stage 4 compares the two tokenizers).
        let inh = clip_core::distill::inherit(model, &teacher.model, false)?;
        clip_cli::distill::print_inherited(&inh);
        if inh.skipped.iter().any(|l| l.contains("tokenizer")) {
            println!(
                "  (stage 1 reads no data, so it has no tokenizer of the student's to compare: stage 4 inherits the token table too when the student reads the teacher's ids)"
            );
        }
        report.metric("inherited", serde_json::to_value(&inh)?);
    }
    println!();
    Ok(())
}

/// The parameters of each part, trainable and frozen.
fn count_parameters(model: &ClipModel, report: &mut Report) {
    println!("\nparameters:");
    let mut parts = serde_json::Map::new();
    for g in Group::ALL {
        let (tr, fr) = model.params.count(g);
        println!(
            "  {:<12} {:>14} trainable {:>14} frozen",
            g.as_str(),
            fmt_count(tr),
            fmt_count(fr)
        );
        parts.insert(g.as_str().into(), serde_json::json!({ "trainable": tr, "frozen": fr }));
    }
    let total = model.params.total_params();
    println!("  {:<12} {:>14}\n", "total", fmt_count(total));
    report.metric("parameters", parts);
    report.metric("total_parameters", total);
    report.check("build", true, format!("{} parameters", fmt_count(total)));
}

/// A batch of random images and token ids of the config's shapes.
struct RandomInputs {
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
    batch: usize,
    projection_dim: usize,
    loss: String,
}

impl RandomInputs {
    fn new(cfg: &ClipConfig, dev: &Device, batch: usize) -> Result<Self> {
        let s = cfg.image.image_size;
        let l = cfg.max_tokens().min(16);
        Ok(Self {
            images: Tensor::randn(0f32, 1f32, (batch, 3, s, s), dev)?,
            ids: Tensor::rand(0f32, cfg.text.vocab_size as f32, (batch, l), dev)?.to_dtype(DType::U32)?,
            mask: Tensor::ones((batch, l), DType::U32, dev)?,
            batch,
            projection_dim: cfg.projection_dim,
            loss: cfg.loss.to_string(),
        })
    }
}

/// One forward pass and its loss on the random inputs: the shapes, every value finite.
fn forward(model: &ClipModel, x: &RandomInputs, train: bool, report: &mut Report) -> Result<()> {
    let mode = if train { "train" } else { "eval" };
    let t = Instant::now();
    let e = match model.forward(&x.images, &x.ids, &x.mask, train) {
        Ok(e) => e,
        Err(e) => {
            report.check(&format!("forward ({mode})"), false, format!("{e:#}"));
            return Ok(());
        }
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    report.metric(&format!("forward_{mode}_ms"), ms);
    let want = [x.batch, x.projection_dim];
    report.check(
        &format!("forward ({mode})"),
        e.image.dims() == want && e.text.dims() == want,
        format!(
            "image {:?}, text {:?}, expected {want:?} each; {ms:.0} ms for batch {}",
            e.image.dims(),
            e.text.dims(),
            x.batch
        ),
    );
    let finite = all_finite(&e.image)? && all_finite(&e.text)?;
    report.check(
        &format!("finite ({mode})"),
        finite,
        if finite {
            "every embedding value is finite"
        } else {
            "NaN or Inf in the embeddings: the initialisation or a layer is broken"
        },
    );
    let loss = model.loss(&e, None)?.to_scalar::<f32>()?;
    report.metric(&format!("loss_{mode}"), loss);
    report.check(
        &format!("loss ({mode})"),
        loss.is_finite(),
        format!("{} loss {loss:.4} on random inputs", x.loss),
    );
    Ok(())
}

/// What came from pretrained weights, and the probe values to compare with PyTorch.
mod pretrained {
    use clip_cli::Report;
    use clip_core::hub::Hub;
    use clip_core::pretrained::{self, LoadReport};
    use clip_core::pretrained_clip::ClipLoad;
    use clip_core::ClipModel;

    pub fn show(loaded: &LoadReport, cfg: &clip_core::ClipConfig, report: &mut Report) {
        if let Some(clip) = &loaded.clip {
            show_clip(clip, cfg, report);
            return;
        }
        if loaded.towers.is_empty() {
            return;
        }
        println!("\npretrained weights:");
        for t in &loaded.towers {
            println!(
                "  {:<5} tower  {}{}\n               {}: {} tensors loaded, {} ignored",
                format!("{:?}", t.tower).to_lowercase(),
                t.source,
                t.commit
                    .as_deref()
                    .map(|c| format!(" (commit {c})"))
                    .unwrap_or_default(),
                t.file.display(),
                t.loaded,
                t.ignored
            );
        }
        println!(
            "  {} tensors start fresh (projection heads, logit_scale, towers without pretrained weights)",
            loaded.fresh
        );
        report.metric("pretrained", loaded);
    }

    /// A whole pretrained CLIP: where each file came from, the architecture its config gave, the
    /// tokenizer and the preprocessing.
    fn show_clip(clip: &ClipLoad, cfg: &clip_core::ClipConfig, report: &mut Report) {
        let i = &cfg.image;
        println!("\npretrained CLIP: {} ({})", clip.source, clip.format.describe());
        if let Some(c) = &clip.commit {
            println!("  commit         {c}");
        }
        println!("  config         {}", clip.config_file.display());
        println!(
            "  weights        {}: {} tensors loaded into every tensor of the model, {} ignored",
            clip.weights_file.display(),
            clip.loaded,
            clip.ignored
        );
        println!("  image tower    {}", i.describe());
        println!("  text tower     {}", cfg.text.describe());
        println!(
            "  heads          bias-free projections to {} dimensions; logit_scale from the checkpoint",
            cfg.projection_dim
        );
        let tok = match pretrained::tokenizer(cfg, &Hub::from_env()) {
            Ok(Some((t, file))) => format!(
                "{} ({} ids, captions cut at {} tokens)",
                file.display(),
                t.vocab_size(),
                t.max_len()
            ),
            Ok(None) => "none".into(),
            Err(e) => {
                report.check("tokenizer", false, format!("{e:#}"));
                return;
            }
        };
        println!("  tokenizer      {tok}");
        let fit = if cfg.data.center_crop {
            "shortest side resized (bicubic), centre crop"
        } else {
            "resized to the square (bicubic, aspect ratio not kept)"
        };
        println!(
            "  preprocessing  {} px: {fit}; mean {:?}, std {:?}",
            i.image_size, i.mean, i.std
        );
        report.check(
            "pretrained CLIP",
            true,
            format!("{} loaded: {} tensors", clip.source, clip.loaded),
        );
        report.metric("pretrained_clip", clip);
        report.metric("tokenizer", tok);
    }

    /// The first 8 pooled values of each tower (eval mode, before the heads) on fixed inputs.
    pub fn probe(model: &ClipModel, report: &mut Report) {
        let tok = match pretrained::tokenizer(&model.config, &Hub::from_env()) {
            Ok(t) => t.map(|(t, _)| t),
            Err(e) => {
                report.check("probe", false, format!("loading the text model's tokenizer: {e:#}"));
                return;
            }
        };
        match pretrained::probe(model, tok.as_ref()) {
            Ok(p) => {
                let show = |v: &[f32]| {
                    v.iter()
                        .take(4)
                        .map(|x| format!("{x:+.4}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!("\nprobe (evaluation mode, pooled features before the heads):");
                println!(
                    "  image tower on a grey {0}×{0} image: {1} …",
                    p.image_size,
                    show(&p.image)
                );
                if let (Some(ids), Some(text)) = (&p.token_ids, &p.text) {
                    println!("  text tower on {:?} (ids {ids:?}): {} …", p.caption, show(text));
                }
                report.metric("probe", &p)
            }
            Err(e) => {
                report.check("probe", false, format!("{e:#}"));
            }
        }
    }
}

/// Multiplies two small matrices on `dev` and compares with the product computed here. The
/// entries are multiples of 1/8 below 1, so every partial sum is exact in f32 and any difference
/// is the device's error, not rounding.
fn device_probe(dev: &Device) -> Result<()> {
    let (m, k, n) = (64, 48, 32);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let got = Tensor::from_slice(&a, (m, k), dev)?
        .matmul(&Tensor::from_slice(&b, (k, n), dev)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            let g = got[i * n + j];
            if g != want {
                anyhow::bail!("the device computed {g} where {want} is exact (row {i}, column {j}): its results cannot be trusted");
            }
        }
    }
    Ok(())
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
}
