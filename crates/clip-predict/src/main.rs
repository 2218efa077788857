//! clip-predict — use a model trained by stage 4.
//!
//! The tutorial ends with two predictions: give the model an image and it names the caption that
//! fits; give it a caption and it finds the photo. These are `image-to-text` and `text-to-image`;
//! `index` embeds a folder of images once so searching it is instant; `eval` measures retrieval
//! recall on a caption dataset, or zero-shot accuracy on class folders; `serve` is a local web
//! page (and JSON API) to search an index by caption or by image.
//!
//! Every command takes a model trained by stage 4 (`--run DIR`), or a pretrained CLIP as it is
//! (`--model clip-vit-b-32`, a Hugging Face repo, or a folder): zero-shot on day one.

mod benchmark_format;
mod commands;
mod eval;
mod export;
mod model;
mod predict;
mod search;
mod serve;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clip-predict",
    about = "Use a trained clipmine model (--run) or a pretrained CLIP (--model): image → text, text → image, an image index, evaluation."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Where to run: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[arg(
        long,
        global = true,
        value_name = "fp32|bf16",
        value_parser = clip_cli::args::parse_precision,
        help = clip_cli::args::PRECISION_HELP,
        long_help = "GEMM precision: fp32 (default) or bf16 — mixed precision as PyTorch autocast: bf16 operands with \
fp32 accumulation on AMX tiles, everything else fp32; refused on CPUs without AMX.\n\n\
How to compute, not part of the model: a run trained in bf16 embeds in fp32 unless this says bf16, and an \
index embedded in one precision is searched with queries embedded in the other. The CPU only: with \
--device cuda or metal, bf16 is refused. `stage1-build` says what this CPU offers."
    )]
    precision: Option<clip_core::nn::Precision>,
}

/// The model to use: one trained by stage 4, or a pretrained CLIP as it is.
#[derive(clap::Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct ModelChoice {
    /// A run folder written by stage 4.
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// A pretrained CLIP, zero-shot (untrained by clipmine): a preset (clip-vit-b-32, clip-rn50,
    /// chinese-clip-vit-b-16), a Hugging Face repo (openai/clip-vit-base-patch32,
    /// org/name@revision; from the Hub cache, HF_HUB_OFFLINE=1 for no network), or a folder in
    /// Hugging Face (config.json + model.safetensors) or open_clip (open_clip_config.json +
    /// weights) layout.
    #[arg(long, value_name = "NAME|DIR")]
    pub model: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Rank captions for each image (cosine score and softmax probability).
    ImageToText {
        #[command(flatten)]
        model: ModelChoice,
        /// Images to caption.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Candidate captions.
        #[arg(long, num_args = 1.., conflicts_with = "captions")]
        texts: Vec<String>,
        /// A file of candidate captions, one per line (or a dataset's captions file).
        #[arg(long)]
        captions: Option<PathBuf>,
        /// Show the best K captions per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
    /// Find the images that best fit a caption, from an index (or a folder, embedded on the fly).
    TextToImage {
        #[command(flatten)]
        model: ModelChoice,
        /// The caption, e.g. "一杯咖啡".
        text: String,
        /// An index written by `index`.
        #[arg(long, conflicts_with = "images")]
        index: Option<PathBuf>,
        /// A folder of images to search without an index.
        #[arg(long)]
        images: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// How to search an index: approx (HNSW graphs where built, else compact), compact (int8
        /// scan, re-ranked exactly), exact (every f32 embedding).
        #[arg(long, default_value = "approx")]
        mode: clip_core::index::SearchMode,
        /// Draw the best images with their scores into this PNG.
        #[arg(long)]
        sheet: Option<PathBuf>,
    },
    /// Embed every image under a folder into an index (re-running embeds only new or changed files).
    Index {
        #[command(flatten)]
        model: ModelChoice,
        #[arg(long)]
        images: PathBuf,
        /// The index folder (default: RUN/index; required with --model).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// HNSW graphs for approximate search: auto (segments of 20,000+ photos), always, never.
        #[arg(long, default_value = "auto")]
        approx: clip_core::index::GraphPolicy,
    },
    /// A local web page to search an index: by caption, or by a dropped-in image (best captions
    /// from --texts / --texts-file, and the most similar photos); JSON API at /api/search?q=…
    Serve {
        #[command(flatten)]
        model: ModelChoice,
        /// An index written by `index` (default: RUN/index; required with --model).
        #[arg(long)]
        index: Option<PathBuf>,
        /// Where to listen (port 0: any free port; the first line printed says which).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Candidate captions for image queries.
        #[arg(long, num_args = 1.., conflicts_with = "texts_file")]
        texts: Vec<String>,
        /// A file of candidate captions, one per line (or a dataset's captions file).
        #[arg(long, alias = "captions")]
        texts_file: Option<PathBuf>,
        /// Requests running the model at once (each on its own thread).
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Also answer requests for this host name (the listening address, and localhost on a
        /// loopback address, are answered; others get 421). Repeatable.
        #[arg(long = "allow-host", value_name = "NAME")]
        allow_host: Vec<String>,
        /// The indexed folder, named to serve an index of `/`, your home folder (or one above
        /// it) or a system folder, which is otherwise refused; must be the index's folder.
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
    },
    /// Recall@1/5/10 on a caption dataset; zero-shot accuracy on class folders.
    Eval {
        #[command(flatten)]
        model: ModelChoice,
        #[arg(long)]
        data: PathBuf,
        /// Caption templates for class folders ({label} is replaced); several are averaged (a
        /// prompt ensemble), or one file of templates, one per line. Default: the run's
        /// template; with --model, a built-in ensemble (English, or Chinese for Chinese labels).
        #[arg(long, num_args = 1..)]
        templates: Vec<String>,
        /// Write the confusion matrix of a zero-shot evaluation as a PNG.
        #[arg(long)]
        confusion: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// Skip unreadable images (named) instead of failing.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Write a fine-tuned CLIP (or a pretrained one) as a folder Python loads: open_clip
    /// (open_clip_config.json + open_clip_model.safetensors) or Hugging Face (CLIPModel, or
    /// ChineseCLIPModel: config.json, model.safetensors, tokenizer and preprocessor files), or as
    /// ONNX graphs of both encoders (onnx).
    #[command(
        after_help = "Examples:\n  clip-predict export --run runs/mine --format hf exported/mine-hf\n  clip-predict export --run runs/mine --format open_clip exported/mine-oc\n  clip-predict export --run runs/mine --format onnx exported/mine-onnx\n  clip-predict export --run runs/mine --format onnx --quantize int8 exported/mine-int8\n\nthen, in Python:\n  model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:exported/mine-oc\")\n  model = CLIPModel.from_pretrained(\"exported/mine-hf\")\n  image_encoder = onnxruntime.InferenceSession(\"exported/mine-onnx/image_encoder.onnx\")\n\nA ResNet CLIP (RN50 …) exports to open_clip or onnx; a Chinese-CLIP to hf or onnx; every model to onnx."
    )]
    Export {
        #[command(flatten)]
        model: ModelChoice,
        /// open_clip, hf or onnx (image_encoder.onnx, text_encoder.onnx, clip.json and the
        /// tokenizer and preprocessor files: for ONNX Runtime, no Python needed).
        #[arg(long)]
        format: clip_core::export::ExportFormat,
        /// The folder to write (written beside it under a temporary name, then renamed): not the
        /// run or --model folder, nor inside either.
        out: PathBuf,
        /// Replace an earlier export in OUT: the whole folder, which must hold an export's files only.
        #[arg(long)]
        overwrite: bool,
        /// With --format onnx: int8 graphs, as ONNX Runtime's dynamic quantizer writes them —
        /// weights int8 per output channel, activations uint8 quantized as they arrive
        /// (MatMulInteger, ConvInteger); about 4× smaller. What it costs in accuracy and gains in
        /// speed: the README's "Ship it: ONNX".
        #[arg(long, value_name = "int8")]
        quantize: Option<clip_core::export::onnx::Quantize>,
        /// With --format onnx: each graph's weights in a file beside it
        /// (image_encoder.onnx.data, ONNX's external data), read by ONNX Runtime from the same
        /// folder. Done without asking for a graph over protobuf's 2 GB limit (ViT-H and larger).
        #[arg(long = "external-data")]
        external_data: bool,
    },
    /// The tutorial's ending on a dataset: each image's best caption, and each caption's best image.
    Demo {
        #[command(flatten)]
        model: ModelChoice,
        /// A caption dataset (default: the demo set).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    clip_cli::memory::keep_freed_memory();
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use clip_core::nn::Precision;

    use super::Cli;

    #[test]
    fn the_parser_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn precision_is_taken_before_or_after_any_command_and_only_fp32_or_bf16() {
        let p = |args: &[&str]| Cli::try_parse_from(["clip-predict"].iter().chain(args)).map(|c| c.precision);
        assert_eq!(p(&["demo", "--run", "r"]).unwrap(), None);
        assert_eq!(
            p(&["--precision", "bf16", "demo", "--run", "r"]).unwrap(),
            Some(Precision::Bf16)
        );
        for cmd in [
            &["eval", "--run", "r", "--data", "d"][..],
            &["index", "--run", "r", "--images", "i"],
            &["serve", "--run", "r"],
            &["image-to-text", "--run", "r", "x.jpg", "--texts", "a"],
            &["text-to-image", "--run", "r", "a cat"],
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--precision", "fp32"]);
            assert_eq!(p(&args).unwrap(), Some(Precision::Fp32), "{cmd:?}");
        }
        let e = p(&["--precision", "fp16", "demo", "--run", "r"]).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("fp32 or bf16"), "{e}");
    }
}
