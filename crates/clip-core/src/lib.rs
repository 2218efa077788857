//! clipmine's library: train your own small CLIP, one gated stage at a time.
//!
//! Layers and data only — no argument parsing, progress bars, reports or plots: those belong to
//! the programs (`crates/clip-cli` and the stage binaries). The modules, alphabetically:

/// Weights and optimiser state as checksummed safetensors: the one place they are read and written.
pub mod checkpoint;
/// The recipe in one value: model shape, loss, data and training knobs, from TOML or a preset.
pub mod config;
/// Image–caption data: datasets, paths, decoding, tokenizer, batches.
pub mod data;
/// Picking a device (`auto`, `cpu`, `cuda[:N]`, `metal`) and describing it.
pub mod device;
/// Data-parallel training: the ranks of a run and the collectives they exchange.
pub mod dist;
/// Knowledge distillation: a teacher's embeddings, cached once, and the student's loss.
pub mod distill;
/// Embedding many images or captions in evaluation mode.
pub mod embed;
/// Writing a CLIP back out as an open_clip or Hugging Face folder.
pub mod export;
/// Frozen towers' outputs computed once and kept on disk.
pub mod feature_cache;
/// Atomic, checksummed writes, manifests, folder syncs and stale-file cleanup: the leaf every
/// module that writes to disk builds on.
pub mod files;
/// Training over many epochs, with validation, checkpoints and resume.
pub mod fit;
/// Stage 4's final gate: thresholds set against what a model that learned nothing scores.
pub mod gates;
/// A model's architecture read from its config.json (timm, Hugging Face DistilBERT / BERT).
pub mod hf_config;
/// Finding a model's files: the Hugging Face cache and Hub (hf-hub), or a local path.
pub mod hub;
/// An incremental image index for text → image search.
pub mod index;
/// Long lists cut short in messages ("… and N more").
pub mod listing;
/// The contrastive losses (`clip`, `soft`) and cosine similarity.
pub mod loss;
/// The CLIP model: ResNet image tower, DistilBERT / BERT text tower, projection heads.
pub mod model;
/// Opening a model to use: a stage 4 run folder or a pretrained CLIP.
pub mod model_source;
/// Layers with working backward passes (convolution, BatchNorm, LayerNorm, attention …).
pub mod nn;
/// The one table of tensor names between clipmine's CLIP and open_clip's, read both ways.
pub mod open_clip_names;
/// AdamW with a learning rate per group and saveable state.
pub mod optim;
/// Trainable parameters by name and group (image tower, text tower, heads), seeded.
pub mod params;
/// Dataset → split → tokenizer → images → loader, for the training stages.
pub mod prepare;
/// Starting from open-source towers: configs, weights (name mapping) and tokenizers.
pub mod pretrained;
/// Whole pretrained CLIPs (OpenAI, open_clip, Hugging Face, Chinese-CLIP): their config, weights
/// and tokenizer.
pub mod pretrained_clip;
/// Progress of long work, reported to whoever shows it.
pub mod progress;
/// Recall@K and ranking helpers.
pub mod retrieval;
/// Derived seeds (SplitMix64) for every random choice.
pub mod rng;
/// A finished run folder, opened for prediction or resuming.
pub mod run_dir;
/// Learning-rate schedules: ReduceLROnPlateau and cosine with warm-up.
pub mod schedule;
/// One training step.
pub mod train;
/// WiSE-FT: interpolating a checkpoint and its fine-tuned weights.
pub mod wise_ft;

pub use config::ClipConfig;
pub use model::ClipModel;

/// The candle version clipmine is built and tested against.
pub const CANDLE_VERSION: &str = "0.11.1";
