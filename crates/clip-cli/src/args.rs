//! Options every stage shares, so `cargo xtask verify` can pass the same flags to each.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clip_core::config::{ClipConfig, Schedule};
use clip_core::nn::Precision;
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

/// `--precision`'s one-line help, shared by every program that takes it.
pub const PRECISION_HELP: &str = "GEMM precision: fp32 (default) or bf16 — mixed precision as PyTorch autocast: bf16 operands with fp32 accumulation on AMX tiles, everything else fp32; refused on CPUs without AMX";

/// The precision of the GEMMs, flattened into the programs that train or time the model
/// (stages 3 and 4, the benchmarks). `clip-predict` has its own flag (it reads no config's
/// `train.precision`) with the same parser and help.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct PrecisionArg {
    #[arg(
        long,
        value_name = "fp32|bf16",
        value_parser = parse_precision,
        help = PRECISION_HELP,
        long_help = "GEMM precision: fp32 (default) or bf16 — mixed precision as PyTorch autocast: bf16 operands with \
fp32 accumulation on AMX tiles, everything else fp32; refused on CPUs without AMX.\n\n\
In bf16 the GEMMs (linear layers, attention, convolutions, forward and backward) round their operands to bf16 \
and accumulate in fp32, but for those too small to gain from AMX, which stay fp32; weights, AdamW's state, the \
loss, norms and softmax stay fp32. The CPU only: with \
--device cuda or metal, bf16 is refused. Given, it wins over the config's train.precision (a resumed run \
keeps the precision recorded in its config.toml unless this is given) and is recorded in the JSON report \
and the run's config. `stage1-build` says what this CPU offers."
    )]
    pub precision: Option<Precision>,
}

/// `--precision`'s parser: fp32 or bf16 (also f32, float32, bfloat16), any case; the error names both.
pub fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse::<Precision>().map_err(|e| e.to_string())
}

impl PrecisionArg {
    /// The precision to run in — the flag, else the config's `train.precision` (fp32 unless set)
    /// — written back into `cfg.train.precision` (so the run's config and report record it), then
    /// set for the whole process with [`activate_precision`]. Call it once, before the model's
    /// first forward pass. A bf16 the config asked for, refused here, says so and how to run in
    /// fp32 instead.
    pub fn apply(&self, cfg: &mut ClipConfig, dev: &Device) -> Result<Precision> {
        let p = self.resolve(cfg);
        match self.precision {
            Some(_) => activate_precision(p, dev)?,
            None => activate_precision(p, dev).with_context(|| {
                format!(
                    "the config asks for train.precision = \"{p}\" (a resumed run keeps its own): pass --precision fp32 to run in fp32"
                )
            })?,
        }
        Ok(p)
    }

    /// The flag, else the config's `train.precision`; written into the config.
    pub fn resolve(&self, cfg: &mut ClipConfig) -> Precision {
        if let Some(p) = self.precision {
            cfg.train.precision = p;
        }
        cfg.train.precision
    }
}

/// Sets the GEMM precision of this process (`clip_core::nn::set_precision`) for a model on
/// `dev`: bf16 is the CPU's (AMX tiles) and is refused on any other device, and on a CPU without
/// AMX with the reason.
pub fn activate_precision(p: Precision, dev: &Device) -> Result<()> {
    if p == Precision::Bf16 && !dev.is_cpu() {
        bail!(
            "--precision bf16 refused on {}: bf16 is implemented for the CPU's AMX tiles; on cuda/metal use fp32 (--precision fp32), or run on the CPU (--device cpu)",
            clip_core::device::describe(dev)
        );
    }
    clip_core::nn::set_precision(p)
}

/// What a program prints about its precision: the name and what it means here.
pub fn describe_precision(p: Precision) -> String {
    match p {
        Precision::Fp32 => "fp32 (every GEMM in fp32)".into(),
        Precision::Bf16 => {
            "bf16 (GEMM operands in bf16 on AMX tiles, fp32 accumulation; GEMMs too small to gain and everything else fp32)"
                .into()
        }
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
    /// Run each batch through the towers M pairs at a time (gradient cache): the loss and its
    /// gradient are still the whole batch's (every pair a negative for every other), in the
    /// activation memory of M pairs, for a second forward pass. M must divide --batch-size; e.g.
    /// --batch-size 512 --micro-batch 16. Exact for ViT and transformer towers; a BatchNorm
    /// tower normalises each micro-batch with its own statistics.
    #[arg(long, value_name = "M")]
    pub micro_batch: Option<usize>,
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
        set(&mut t.micro_batch, self.micro_batch);
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

/// `s` as one POSIX shell word: as it is when it has only safe characters, else in single quotes
/// (a `'` inside written `'\''`), so a printed command (a resume line, an export's "or here")
/// can be pasted whatever the folder's name.
pub fn shell_quoted(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_printed_folder_is_one_shell_word() {
        use super::shell_quoted as q;
        assert_eq!(q("runs/exp-1"), "runs/exp-1");
        assert_eq!(q("my exports/it's"), "'my exports/it'\\''s'");
        assert_eq!(q("$(rm -rf ~)"), "'$(rm -rf ~)'");
        assert_eq!(q(""), "''");
    }

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

    #[derive(Parser)]
    struct WithPrecision {
        #[command(flatten)]
        precision: PrecisionArg,
    }

    #[test]
    fn precision_parses_fp32_and_bf16_and_names_them_when_refusing_others() {
        let p = |args: &[&str]| WithPrecision::try_parse_from(["x"].iter().chain(args)).map(|c| c.precision.precision);
        assert_eq!(p(&[]).unwrap(), None);
        assert_eq!(p(&["--precision", "bf16"]).unwrap(), Some(Precision::Bf16));
        assert_eq!(p(&["--precision=fp32"]).unwrap(), Some(Precision::Fp32));
        assert_eq!(p(&["--precision", "BF16"]).unwrap(), Some(Precision::Bf16));
        for bad in ["fp16", "int8", ""] {
            let e = p(&["--precision", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            let msg = e.to_string();
            assert!(msg.contains("fp32") && msg.contains("bf16"), "{bad:?}: {msg}");
        }
        let help = <WithPrecision as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("fp32 (default) or bf16") && help.contains("AMX"),
            "{help}"
        );
    }

    #[test]
    fn the_flag_wins_over_the_config_and_is_written_back() {
        let mut cfg = ClipConfig::default();
        assert_eq!(cfg.train.precision, Precision::Fp32);
        let none = PrecisionArg { precision: None };
        assert_eq!(none.resolve(&mut cfg), Precision::Fp32);
        cfg.train.precision = Precision::Bf16;
        assert_eq!(none.resolve(&mut cfg), Precision::Bf16, "no flag: the config's");
        let fp32 = PrecisionArg {
            precision: Some(Precision::Fp32),
        };
        assert_eq!(fp32.resolve(&mut cfg), Precision::Fp32);
        assert_eq!(cfg.train.precision, Precision::Fp32, "written back into the config");
        // fp32 is accepted everywhere.
        fp32.apply(&mut cfg, &Device::Cpu).unwrap();
        assert_eq!(clip_core::nn::precision(), Precision::Fp32);
    }

    #[test]
    fn bf16_on_the_cpu_is_refused_exactly_where_clip_core_refuses_it() {
        // Whether bf16 may run here is clip-core's to say; this checks that the refusal reaches
        // the user with its reason. Where bf16 is available it is not switched on here (the
        // precision is process-wide, and other tests run beside this one): stage 3's tests run it.
        let Some(why) = clip_core::nn::precision::bf16_refusal() else {
            eprintln!("skipped: this CPU runs bf16 (AMX), so there is no refusal to check");
            return;
        };
        let e = format!("{:#}", activate_precision(Precision::Bf16, &Device::Cpu).unwrap_err());
        assert!(e.contains("refused") && e.contains(&why), "{e}");
        assert_eq!(clip_core::nn::precision(), Precision::Fp32);
        let mut cfg = ClipConfig::default();
        cfg.train.precision = Precision::Bf16;
        let e = format!(
            "{:#}",
            PrecisionArg::default().apply(&mut cfg, &Device::Cpu).unwrap_err()
        );
        assert!(
            e.contains("train.precision") && e.contains("--precision fp32") && e.contains(&why),
            "{e}"
        );
    }
}
