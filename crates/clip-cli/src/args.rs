//! Options every stage shares, so `cargo xtask verify` can pass the same flags to each.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clip_core::config::{ClipConfig, Schedule};
use clip_core::prepare::{DataSource, ImageCache};

/// Model and device selection, flattened into each stage's `--help`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A TOML config (see assets/configs/); wins over --preset.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A named preset: tiny (CPU-sized, the default), simple-clip (the tutorial's ResNet50 +
    /// DistilBERT from scratch), simple-clip-pretrained (timm resnet50.a1_in1k + distilbert-base-uncased),
    /// simple-clip-pretrained-zh (a multilingual text tower), or a whole pretrained CLIP:
    /// clip-vit-b-32 (OpenAI ViT-B/32), clip-rn50 (OpenAI RN50), chinese-clip-vit-b-16.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Start from this pretrained CLIP, whatever the config says: a Hugging Face repo
    /// (openai/clip-vit-base-patch32, laion/CLIP-ViT-B-32-laion2B-s34B-b79K, org/name@revision)
    /// or a folder in Hugging Face (config.json + model.safetensors) or open_clip
    /// (open_clip_config.json + weights) layout. Its files set the whole model, the tokenizer and
    /// the preprocessing.
    #[arg(long, value_name = "REPO|DIR")]
    pub pretrained: Option<String>,
    /// Where to run: auto (a GPU if compiled in and present), cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed for weights, data order and dropout (overrides the config's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write this stage's report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load_config(&self) -> Result<ClipConfig> {
        let mut cfg = ClipConfig::resolve(self.config.as_deref(), self.preset.as_deref())?;
        if let Some(p) = &self.pretrained {
            // A recipe config (or none) turned into a fine-tune takes a fine-tune's defaults; a
            // config file keeps the training settings it wrote.
            if cfg.pretrained.is_none() && self.config.is_none() {
                cfg.train = clip_core::config::TrainConfig::pretrained_start();
            }
            cfg.pretrained = Some(p.clone());
            cfg.name = p.clone();
        }
        // Pretrained towers take their architecture from their own config.json (from the Hub's
        // cache, or downloaded into it).
        clip_core::pretrained::apply_configs(&mut cfg, &clip_core::hub::Hub::from_env())?;
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        Ok(cfg)
    }

    pub fn device(&self) -> Result<Device> {
        clip_core::device::parse_device(&self.device)
    }
}

/// Data options shared by the stages.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// A dataset: a folder with a captions file (captions.csv/.tsv/.txt/.jsonl) and images, a
    /// captions file, or class folders (root/<label>/*.jpg). Default: the demo set in assets/demo.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Report bad rows (missing or broken images, empty captions …) and go on with the rest.
    #[arg(long)]
    pub skip_bad: bool,
    /// A tokenizer.json to use instead of training a WordPiece tokenizer on the training captions.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Keep the decoded, resized images in this folder [default: DATA/.clipmine-cache]: decoded
    /// once, read back per batch, reused by later runs; changed files are decoded again.
    #[arg(long, value_name = "DIR", conflicts_with = "no_image_cache")]
    pub image_cache: Option<PathBuf>,
    /// Decode every image into memory at every start instead of using the image cache.
    #[arg(long)]
    pub no_image_cache: bool,
    /// Decode images per batch on background threads instead of up front: for data not worth
    /// caching. Nothing is checked before training (run stage 2 for that).
    #[arg(long)]
    pub stream: bool,
    /// Caption template for class folders, with {label}; repeat for several [default: "a photo of a {label}"].
    #[arg(long = "template", value_name = "TEXT")]
    pub templates: Vec<String>,
}

impl DataArgs {
    /// The dataset's path (the demo set when none was given).
    pub fn path(&self) -> PathBuf {
        self.source().path()
    }

    /// What clip-core's `prepare` needs.
    pub fn source(&self) -> DataSource {
        DataSource {
            path: self.data.clone(),
            skip_bad: self.skip_bad,
            tokenizer: self.tokenizer.clone(),
            image_cache: match (&self.image_cache, self.no_image_cache) {
                (_, true) => ImageCache::Off,
                (Some(dir), false) => ImageCache::Dir(dir.clone()),
                (None, false) => ImageCache::Default,
            },
            stream: self.stream,
            templates: self.templates.clone(),
        }
    }
}

/// Training knobs a stage can override on top of the config; each given flag replaces one key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainArgs {
    /// Epochs in all (a resumed run continues up to this many) [default: the config's].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Pairs per batch [default: the config's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate of the image tower.
    #[arg(long)]
    pub lr_image: Option<f64>,
    /// Learning rate of the text tower.
    #[arg(long)]
    pub lr_text: Option<f64>,
    /// Learning rate of the projection heads (and the clip loss's temperature).
    #[arg(long)]
    pub lr_head: Option<f64>,
    /// Weight decay: of the heads (the towers have none, as in the tutorial), or of every weight
    /// matrix when fine-tuning a pretrained CLIP (train.decay_towers).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// plateau (ReduceLROnPlateau on validation loss) or cosine (with --warmup-steps).
    #[arg(long, value_parser = parse_schedule)]
    pub schedule: Option<Schedule>,
    /// Steps of linear warm-up for the cosine schedule.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Clip gradients to this global norm (0 = off).
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Accumulate gradients over this many batches per step.
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// Train-time augmentation (random resized crop + horizontal flip).
    #[arg(long)]
    pub augment: bool,
    /// Keep a tower fixed (image, text or both): it runs in evaluation mode, gets no gradient and
    /// no optimiser state, and its features are computed once and cached (the image tower's only
    /// without --augment), so an epoch costs only what still trains.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text", "both"])]
    pub freeze: Option<String>,
    /// Same as --freeze image (kept for older scripts).
    #[arg(long, hide = true)]
    pub freeze_image: bool,
    /// Same as --freeze text (kept for older scripts).
    #[arg(long, hide = true)]
    pub freeze_text: bool,
    /// Lock the image tower (open_clip's --lock-image): no gradient, no optimiser state, its
    /// BatchNorms keep their statistics; with --unlocked-layers N its last N blocks (and the final
    /// norm or attention pool and the projection) still train. Locked with N = 0, the image
    /// projection is locked too and only the text side learns (LiT).
    #[arg(long)]
    pub lock_image: bool,
    /// Lock the text tower, as --lock-image.
    #[arg(long)]
    pub lock_text: bool,
    /// Blocks at the top of a locked tower that still train [default: the config's, 0].
    #[arg(long, value_name = "N")]
    pub unlocked_layers: Option<usize>,
    /// Layer-wise learning-rate decay (e.g. 0.75): each block trains at this factor × the rate
    /// of the block above it; the top (final norm, projection) at the full rate [default: 1, off].
    #[arg(long, value_name = "FACTOR")]
    pub layer_decay: Option<f64>,
    /// Start over in an --out folder that already holds a run: its model, checkpoints and metrics
    /// are deleted first (other files stay). Without it, such a folder is refused.
    #[arg(long)]
    pub overwrite: bool,
}

fn parse_schedule(s: &str) -> std::result::Result<Schedule, String> {
    match s {
        "plateau" => Ok(Schedule::Plateau),
        "cosine" => Ok(Schedule::Cosine),
        _ => Err(format!("unknown schedule {s:?}: use plateau or cosine")),
    }
}

impl TrainArgs {
    /// Writes every given flag into `cfg`; flags not given leave the config's value.
    pub fn apply(&self, cfg: &mut ClipConfig) -> Result<()> {
        let t = &mut cfg.train;
        set(&mut t.epochs, self.epochs);
        set(&mut t.batch_size, self.batch_size);
        set(&mut t.lr_image, self.lr_image);
        set(&mut t.lr_text, self.lr_text);
        set(&mut t.lr_head, self.lr_head);
        set(&mut t.weight_decay, self.weight_decay);
        set(&mut t.schedule, self.schedule);
        set(&mut t.warmup_steps, self.warmup_steps);
        set(&mut t.clip_grad_norm, self.clip_grad_norm);
        set(&mut t.accumulate, self.accumulate);
        t.lock_image |= self.lock_image;
        t.lock_text |= self.lock_text;
        set(&mut t.unlocked_layers, self.unlocked_layers);
        set(&mut t.layer_decay, self.layer_decay);
        t.freeze_image |= self.freeze_image;
        t.freeze_text |= self.freeze_text;
        if let Some(towers) = &self.freeze {
            t.freeze(towers)?;
        }
        cfg.data.augment |= self.augment;
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Runs a stage's body: an error becomes a message and exit code 2 (a gate failure is 1).
pub fn run_stage(f: impl FnOnce() -> Result<std::process::ExitCode>) -> std::process::ExitCode {
    crate::memory::keep_freed_memory();
    match f() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    #[test]
    fn given_flags_override_the_config_and_only_those() {
        let mut cfg = ClipConfig::default();
        let before = cfg.clone();
        let cli = Cli::parse_from(["x", "--epochs", "7", "--schedule", "cosine", "--freeze", "text"]);
        cli.train.apply(&mut cfg).unwrap();
        assert_eq!(cfg.train.epochs, 7);
        assert_eq!(cfg.train.schedule, Schedule::Cosine);
        assert!(cfg.train.freeze_text && !cfg.train.freeze_image);
        assert_eq!(cfg.train.lr_head, before.train.lr_head);
        assert_eq!(cfg.train.batch_size, before.train.batch_size);
        assert!(Cli::try_parse_from(["x", "--schedule", "linear"]).is_err());
    }
}
