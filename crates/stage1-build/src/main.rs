//! Stage 1 — build: does this environment build the model?
//!
//! Builds the CLIP model from a config, reports the environment and the parameters of each part,
//! runs one forward pass on random inputs, and checks the shapes and that every value is finite.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::Parser;
use clip_cli::fmt_count;
use clip_cli::Report;
use clip_core::params::Group;
use clip_core::{device, ClipModel};

#[derive(Parser)]
#[command(about = "Stage 1 — build the model, count its parameters and run a random forward pass.")]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    /// Batch size of the random forward pass.
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
}

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(1, "build");
    println!("stage 1 — build: does this environment build the model?\n");

    // The environment: what candle was built with and where it will run.
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

    let cfg = match args.model.load_config() {
        Ok(c) => c,
        Err(e) => {
            report.check("config", false, format!("{e:#}"));
            return report.finish(args.model.json.as_deref());
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

    let dev = match args.model.device() {
        Ok(d) => d,
        Err(e) => {
            report.check("device", false, format!("{e:#}"));
            return report.finish(args.model.json.as_deref());
        }
    };
    report.check("device", true, device::describe(&dev));
    report.metric("device", device::describe(&dev));

    // Build: every tensor is allocated and initialised here.
    let t = Instant::now();
    let model = match ClipModel::new(&cfg, &dev) {
        Ok(m) => m,
        Err(e) => {
            report.check("build", false, format!("{e:#} — check the config's shapes"));
            return report.finish(args.model.json.as_deref());
        }
    };
    report.metric("build_seconds", t.elapsed().as_secs_f64());
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

    // A forward pass on random inputs, in evaluation mode, then in training mode.
    let b = args.batch_size.max(2);
    let s = cfg.image.image_size;
    let l = cfg.max_tokens().min(16);
    let images = Tensor::randn(0f32, 1f32, (b, 3, s, s), &dev)?;
    let ids = Tensor::rand(0f32, cfg.text.vocab_size as f32, (b, l), &dev)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((b, l), DType::U32, &dev)?;
    for train in [false, true] {
        let mode = if train { "train" } else { "eval" };
        let t = Instant::now();
        match model.forward(&images, &ids, &mask, train) {
            Ok(e) => {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                report.metric(&format!("forward_{mode}_ms"), ms);
                let want = [b, cfg.projection_dim];
                let shapes_ok = e.image.dims() == want && e.text.dims() == want;
                report.check(
                    &format!("forward ({mode})"),
                    shapes_ok,
                    format!(
                        "image {:?}, text {:?}, expected {want:?} each; {ms:.0} ms for batch {b}",
                        e.image.dims(),
                        e.text.dims()
                    ),
                );
                let finite = all_finite(&e.image)? && all_finite(&e.text)?;
                report.check(
                    &format!("finite ({mode})"),
                    finite,
                    if finite {
                        "every embedding value is finite".into()
                    } else {
                        "NaN or Inf in the embeddings: the initialisation or a layer is broken".to_string()
                    },
                );
                let loss = model.loss(&e, None)?.to_scalar::<f32>()?;
                report.metric(&format!("loss_{mode}"), loss);
                report.check(
                    &format!("loss ({mode})"),
                    loss.is_finite(),
                    format!("{} loss {loss:.4} on random inputs", cfg.loss),
                );
            }
            Err(e) => {
                report.check(&format!("forward ({mode})"), false, format!("{e:#}"));
            }
        }
    }
    report.finish(args.model.json.as_deref())
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
}
