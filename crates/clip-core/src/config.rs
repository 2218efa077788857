//! One config for the whole recipe: model shape, loss, data and training knobs.
//!
//! Read from TOML (`assets/configs/*.toml`) or a named preset. Every field has a default so a config
//! file only needs what differs from `tiny`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Block {
    /// ResNet-18/34: two 3×3 convs, expansion 1.
    Basic,
    /// ResNet-50/101/152: 1×1 → 3×3 (stride here, "v1.5") → 1×1, expansion 4.
    Bottleneck,
}

/// How images are resampled to the model's size (timm's `interpolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
}

/// The image tower's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageArch {
    /// A timm / torchvision ResNet (v1.5), pooled by a global average.
    Resnet,
    /// A CLIP Vision Transformer (OpenAI, open_clip, Hugging Face `CLIPVisionModel`).
    Vit,
    /// OpenAI's ModifiedResNet (CLIP RN50, RN101 …): three-convolution stem, anti-aliased
    /// average-pool strides and attention pooling, whose output is already the embedding.
    ClipResnet,
}

/// How a Vision Transformer turns its tokens into one vector (open_clip's `pool_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImagePool {
    /// The class token (OpenAI's and most checkpoints').
    Tok,
    /// The mean of the patch tokens.
    Avg,
}

/// The largest size one dimension of a model may have (a width, a vocabulary, an image side):
/// far above any real model's, low enough that products of a few never overflow.
pub const MAX_SIZE: usize = 1 << 24;
/// The most blocks (layers, one ResNet stage's depth) a tower may have.
pub const MAX_BLOCKS: usize = 1024;
/// The largest image side a model is prepared at (`image.image_size`, `image.resize`): every
/// photo is resized to it, so it bounds the memory one image takes (CLIPs use 224–448).
pub const MAX_PREPARED_SIDE: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// `resnet` (the recipe's), `vit` or `clip_resnet` (pretrained CLIPs set it).
    pub arch: ImageArch,
    /// Start from a pretrained timm ResNet: a Hugging Face repo id (`timm/resnet50.a1_in1k`,
    /// optionally `@revision`), a local folder with config.json + model.safetensors, or a
    /// `.safetensors` file. Its config.json then sets the architecture and the preprocessing below.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Branch, tag or commit of `pretrained` (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Square input size in pixels.
    pub image_size: usize,
    pub block: Block,
    /// Blocks per stage, e.g. [3, 4, 6, 3] for ResNet50.
    pub depths: Vec<usize>,
    /// Channels of the stem convolution.
    pub stem_width: usize,
    /// Base width of each stage (the block output is width × expansion).
    pub widths: Vec<usize>,
    /// Skip the stem's max-pool (useful for very small images such as 28×28 or 32×32).
    pub stem_pool: bool,
    /// Stride of the stem convolution (2 in ResNet; 1 keeps small images' detail).
    pub stem_stride: usize,
    /// Stem kernel size (7 in ResNet; 3 suits small images).
    pub stem_kernel: usize,
    /// Per-channel normalisation (RGB), as the weights were trained with.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// With `data.center_crop`, the share of the shorter side kept (timm's `crop_pct`: resize
    /// the shorter side to size / crop_pct, then crop the centre).
    pub crop_pct: f64,
    /// With `data.center_crop`: resize the shorter side to this many pixels first, then crop the
    /// centre `image_size` square, as transformers' `CLIPImageProcessor` does with
    /// `size.shortest_edge` (read from a checkpoint's `preprocessor_config.json`). Unset: the
    /// centre `crop_pct` of the shorter side is cropped, then resized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    pub interpolation: Interpolation,
    /// Start every residual block's last BatchNorm scale γ at 0 (timm's and torchvision's
    /// `zero_init_last`), so each block starts as the identity and a deep ResNet trains like a
    /// shallow one at first. The price: on the very first step the blocks' other weights get
    /// exactly zero gradient (as in PyTorch). On in `simple-clip` (as the reference's timm
    /// ResNet50); off in `tiny`, whose first step stage 3 checks for a gradient everywhere.
    pub zero_init_last: bool,
    /// ViT: patch size in pixels (the patch convolution's kernel and stride).
    pub patch_size: usize,
    /// ViT: token width; `clip_resnet`: the base width (64 in RN50).
    pub width: usize,
    /// ViT: number of transformer blocks.
    pub layers: usize,
    /// ViT and `clip_resnet`'s attention pool: number of attention heads.
    pub heads: usize,
    /// ViT: feed-forward width.
    pub mlp_dim: usize,
    /// ViT: `tok` (class token) or `avg` pooling.
    pub pool: ImagePool,
    /// ViT: the feed-forward activation (`quick_gelu` for OpenAI's weights, `gelu` for LAION's).
    pub activation: Activation,
    /// ViT: LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `clip_resnet`: the attention pool's output size (the embedding size).
    pub output_dim: usize,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            arch: ImageArch::Resnet,
            patch_size: 16,
            width: 64,
            layers: 2,
            heads: 2,
            mlp_dim: 256,
            pool: ImagePool::Tok,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            output_dim: 0,
            pretrained: None,
            revision: None,
            image_size: 64,
            block: Block::Basic,
            depths: vec![1, 1, 1, 1],
            stem_width: 16,
            widths: vec![16, 32, 64, 128],
            stem_pool: true,
            stem_stride: 2,
            stem_kernel: 7,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            crop_pct: 1.0,
            resize: None,
            interpolation: Interpolation::Bilinear,
            zero_init_last: false,
        }
    }
}

impl ImageConfig {
    pub fn expansion(&self) -> usize {
        match self.block {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
    /// The architecture in one line, as stage 1 prints it.
    pub fn describe(&self) -> String {
        match self.arch {
            ImageArch::Resnet => format!(
                "ResNet ({:?} blocks {:?}, widths {:?}), {} px",
                self.block, self.depths, self.widths, self.image_size
            )
            .to_lowercase(),
            ImageArch::Vit => format!(
                "ViT {}×{} patches of {} px, {} blocks × {} wide, {} heads, MLP {}, {}, pooled by {}",
                self.image_size / self.patch_size.max(1),
                self.image_size / self.patch_size.max(1),
                self.patch_size,
                self.layers,
                self.width,
                self.heads,
                self.mlp_dim,
                self.activation.name(),
                match self.pool {
                    ImagePool::Tok => "the class token",
                    ImagePool::Avg => "the mean of the patch tokens",
                }
            ),
            ImageArch::ClipResnet => format!(
                "OpenAI ModifiedResNet (stages {:?}, width {}), attention pool ({} heads) → {}, {} px",
                self.depths, self.width, self.heads, self.output_dim, self.image_size
            ),
        }
    }

    /// Size of the pooled image feature that enters the projection head.
    pub fn feature_dim(&self) -> usize {
        match self.arch {
            ImageArch::Resnet => self.widths.last().copied().unwrap_or(0) * self.expansion(),
            ImageArch::Vit => self.width,
            ImageArch::ClipResnet => self.output_dim,
        }
    }
}

/// Which transformer family the text tower is: the layout and names of its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    /// Hugging Face `DistilBertModel` (`transformer.layer.N.attention.q_lin`, …).
    Distilbert,
    /// Hugging Face `BertModel` and its family (MiniLM, bert-base-chinese …): token-type
    /// embeddings, `encoder.layer.N.attention.self.query`, …
    Bert,
    /// The CLIP text transformer (OpenAI, open_clip, Hugging Face `CLIPTextModel`): pre-LN
    /// blocks under a causal mask, `final_layer_norm`, pooled at the end-of-text token.
    Clip,
}

/// How the text tower turns token states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token ([CLS]), as the tutorial.
    Cls,
    /// The average over real (unpadded) tokens, as sentence-transformers models are trained.
    Mean,
    /// The end-of-text token (CLIP's text transformer): the first `text.eos_token_id`, else the
    /// last real token.
    Eot,
}

/// The feed-forward activation (Hugging Face's `hidden_act` / `activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
    /// x·σ(1.702x), OpenAI CLIP's approximation (open_clip's `quick_gelu`).
    QuickGelu,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextConfig {
    /// Start from a pretrained Hugging Face model (`distilbert/distilbert-base-uncased`,
    /// `google-bert/bert-base-chinese`, `org/name@revision`) or a local folder / `.safetensors`
    /// file. Its config.json then sets `kind` and the architecture, and its tokenizer is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Branch, tag or commit of `pretrained` (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub kind: TextKind,
    pub pooling: Pooling,
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Feed-forward width (DistilBERT's `hidden_dim`).
    pub hidden_dim: usize,
    pub max_position_embeddings: usize,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Rows of BERT's token-type table (only `kind = "bert"` has one).
    pub type_vocab_size: usize,
    /// The end-of-text id `pooling = "eot"` looks for (49407 in OpenAI's vocabulary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
}

impl TextConfig {
    /// The architecture in one line, as stage 1 prints it.
    pub fn describe(&self) -> String {
        let (family, pooled) = match self.kind {
            TextKind::Distilbert => ("DistilBERT (post-LN)", self.pooling),
            TextKind::Bert => ("BERT (post-LN)", self.pooling),
            TextKind::Clip => ("CLIP text transformer (pre-LN, causal)", self.pooling),
        };
        format!(
            "{family}, {} layers × {} wide, {} heads, MLP {}, {}, vocabulary {}, {} positions, pooled at {}",
            self.n_layers,
            self.dim,
            self.n_heads,
            self.hidden_dim,
            self.activation.name(),
            self.vocab_size,
            self.max_position_embeddings,
            match pooled {
                Pooling::Cls => "[CLS]".to_string(),
                Pooling::Mean => "the mean of the tokens".to_string(),
                Pooling::Eot => match self.eos_token_id {
                    Some(e) => format!("the end-of-text token ({e})"),
                    None => "the last token".to_string(),
                },
            }
        )
    }
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "GELU (erf)",
            Activation::GeluNew => "GELU (tanh)",
            Activation::Relu => "ReLU",
            Activation::QuickGelu => "QuickGELU",
        }
    }
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            pretrained: None,
            revision: None,
            kind: TextKind::Distilbert,
            pooling: Pooling::Cls,
            vocab_size: 2048,
            dim: 128,
            n_layers: 2,
            n_heads: 4,
            hidden_dim: 256,
            max_position_embeddings: 64,
            dropout: 0.1,
            attention_dropout: 0.1,
            layer_norm_eps: 1e-12,
            activation: Activation::Gelu,
            type_vocab_size: 2,
            eos_token_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// The tutorial's: soft targets from image–image and text–text similarity.
    Soft,
    /// The CLIP paper's: normalised embeddings, learnable temperature, targets on the diagonal.
    Clip,
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossKind::Soft => "soft",
            LossKind::Clip => "clip",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// ReduceLROnPlateau on validation loss (the tutorial's).
    Plateau,
    /// Linear warm-up, then cosine decay to zero over the run.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub epochs: usize,
    pub lr_image: f64,
    pub lr_text: f64,
    pub lr_head: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub patience: usize,
    pub factor: f64,
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (0 = off).
    pub clip_grad_norm: f64,
    /// Accumulate gradients over this many micro-batches per optimiser step.
    pub accumulate: usize,
    /// Run each batch through the towers this many pairs at a time (0 = the whole batch at
    /// once), with the gradient cache (`train::grad_cache`): the loss and its gradient are still
    /// the whole batch's, every pair a negative for every other, in the activation memory of
    /// `micro_batch` pairs, for a second forward pass. Must divide `batch_size`.
    pub micro_batch: usize,
    /// Keep the image tower fixed: evaluation mode, no gradient, no optimiser state (and its
    /// features cached when augmentation is off).
    pub freeze_image: bool,
    /// Keep the text tower fixed: evaluation mode, no gradient, no optimiser state, features cached.
    pub freeze_text: bool,
    /// Lock the image tower but its last `unlocked_layers` blocks (open_clip's `--lock-image`):
    /// the locked part gets no gradient and no optimiser state, its BatchNorms keep their
    /// statistics. With `unlocked_layers = 0` the image projection is locked too (LiT).
    pub lock_image: bool,
    /// Lock the text tower but its last `unlocked_layers` blocks (`--lock-text`).
    pub lock_text: bool,
    /// Blocks at the top of a locked tower that still train, with what follows them (the final
    /// LayerNorm or attention pool, and the projection).
    pub unlocked_layers: usize,
    /// Layer-wise learning-rate decay: block i of L trains at lr·decay^(L−i), the embeddings at
    /// lr·decay^(L+1), the final norm and projection at lr (1 = off).
    pub layer_decay: f64,
    /// Weight decay on every weight matrix of both towers and the heads (open_clip's rule:
    /// not on biases, norms, `logit_scale`), as a pretrained start wants; off, only the heads
    /// decay (the tutorial's rule).
    pub decay_towers: bool,
    /// Warm-up as a share of all steps, for the cosine schedule: the longer of this and
    /// `warmup_steps` is used (a pretrained start: 0.1).
    pub warmup_share: f64,
    /// The precision of the GEMMs (`--precision`): fp32, or bf16 mixed precision on AMX
    /// (`nn::precision`). Recorded with the run; a resumed run keeps it.
    pub precision: Precision,
}

impl TrainConfig {
    /// Freezes `image`, `text` or `both` towers (the stages' `--freeze`).
    pub fn freeze(&mut self, towers: &str) -> Result<()> {
        match towers {
            "image" => self.freeze_image = true,
            "text" => self.freeze_text = true,
            "both" => (self.freeze_image, self.freeze_text) = (true, true),
            other => bail!("cannot freeze {other:?}: name image, text or both"),
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            epochs: 30,
            lr_image: 1e-4,
            lr_text: 1e-5,
            lr_head: 1e-3,
            weight_decay: 1e-3,
            schedule: Schedule::Plateau,
            patience: 1,
            factor: 0.8,
            warmup_steps: 0,
            clip_grad_norm: 0.0,
            accumulate: 1,
            micro_batch: 0,
            freeze_image: false,
            freeze_text: false,
            lock_image: false,
            lock_text: false,
            unlocked_layers: 0,
            layer_decay: 1.0,
            decay_towers: false,
            warmup_share: 0.0,
            precision: Precision::Fp32,
        }
    }
}

impl TrainConfig {
    /// Defaults for fine-tuning a pretrained CLIP (a config with `pretrained`), not training
    /// from scratch: small steps on both towers and the checkpoint's own projections (FLYP's
    /// 1e-5, weight decay 0.1 on every weight matrix, cosine decay after a 10 % warm-up), since
    /// the recipe's 1e-3 on a few hundred pairs wipes out what the checkpoint knew.
    pub fn pretrained_start() -> Self {
        Self {
            batch_size: 32,
            epochs: 10,
            lr_image: 1e-5,
            lr_text: 1e-5,
            lr_head: 1e-5,
            weight_decay: 0.1,
            decay_towers: true,
            schedule: Schedule::Cosine,
            warmup_share: 0.1,
            ..Self::default()
        }
    }

    /// Warm-up steps of a run of `total` steps: the longer of `warmup_steps` and the share.
    pub fn warmup(&self, total: u64) -> u64 {
        (self.warmup_steps as u64).max((self.warmup_share * total as f64).round() as u64)
    }

    /// One line saying how the optimiser will treat a pretrained start (stage 4 prints it).
    pub fn describe(&self) -> String {
        let lrs = if self.lr_image == self.lr_text && self.lr_text == self.lr_head {
            format!("lr {:.0e} for both towers and the projections", self.lr_image)
        } else {
            format!(
                "lr {:.0e} image, {:.0e} text, {:.0e} projections",
                self.lr_image, self.lr_text, self.lr_head
            )
        };
        let decay = if self.decay_towers {
            format!("weight decay {} on every weight matrix", self.weight_decay)
        } else {
            format!("weight decay {} on the heads", self.weight_decay)
        };
        let schedule = match self.schedule {
            Schedule::Cosine => "cosine decay after a warm-up".to_string(),
            Schedule::Plateau => format!("×{} after {} epochs without improvement", self.factor, self.patience),
        };
        let mut parts = vec![lrs, decay, schedule];
        if self.layer_decay != 1.0 {
            parts.push(format!("layer-wise lr decay {}", self.layer_decay));
        }
        for (locked, tower) in [(self.lock_image, "image"), (self.lock_text, "text")] {
            if locked {
                parts.push(match self.unlocked_layers {
                    0 => format!("{tower} tower locked"),
                    n => format!(
                        "{tower} tower locked but its last {n} block{}",
                        if n == 1 { "" } else { "s" }
                    ),
                });
            }
        }
        parts.join(", ")
    }
}

/// The precision of the GEMMs (`--precision`, config `train.precision`); `nn::precision` applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 operands and accumulation (the default).
    #[default]
    Fp32,
    /// bf16 operands, fp32 accumulation, fp32 everywhere else (mixed precision).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => anyhow::bail!("unknown precision {other:?}: name fp32 or bf16"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Longest caption in tokens (the tutorial's 200); also capped by the position table.
    pub max_length: usize,
    /// Share of images held out for validation.
    pub val_fraction: f64,
    /// Shorter-side resize + centre crop instead of the tutorial's plain resize.
    pub center_crop: bool,
    /// Train-time random resized crop + horizontal flip.
    pub augment: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            max_length: 200,
            val_fraction: 0.2,
            center_crop: false,
            augment: false,
        }
    }
}

/// Knowledge distillation: a teacher (a pretrained CLIP or a clipmine run) teaches this model.
/// Each loss term has a weight; 0 turns it off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: a run folder written by stage 4, or a pretrained CLIP (a preset such as
    /// `clip-vit-b-32`, a Hugging Face repo, or a folder). None: no distillation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Weight of the usual contrastive loss on the pairs.
    pub contrastive: f64,
    /// Weight of the soft cross-entropy between the teacher's and the student's image–text
    /// similarity matrices, both ways (open_clip's `DistillClipLoss`, TinyCLIP's affinity
    /// mimicking).
    pub affinity: f64,
    /// Weight of feature distillation: the MSE between the student's normalised embedding (through
    /// a learned linear map when the widths differ) and the teacher's, for images and captions
    /// (CLIP-KD's FD, its best single loss, at its weight 2000). CLIP-KD's MSE is a mean over
    /// B × 512 (its teacher's width); here it is scaled to 512 dimensions
    /// ([`crate::distill::FEATURE_WIDTH`]), so 2000 weighs a 64-wide teacher as it weighs a
    /// 512-wide one (a plain mean over 64 would weigh each unit vector's distance 8× more).
    pub feature: f64,
    /// The teacher's embedding width, recorded when training starts (it sizes the linear maps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_dim: Option<usize>,
    /// The teacher's fingerprint (its weights, config and tokenizer), recorded when training
    /// starts: a student that answers captions with its teacher's text tower refuses a teacher
    /// that has changed since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_fingerprint: Option<String>,
    /// With augmentation: how many augmented views of each image the teacher embeds, once, at
    /// the start (MobileCLIP's reinforced data). Epoch e trains on view e mod `views` of every
    /// image — a fixed random crop per view — with the teacher's embedding of that very crop.
    pub views: usize,
    /// Start the student from the teacher's weights where a tower is of the teacher's family
    /// (TinyCLIP's manual inheritance: every k-th block, leading slices; see
    /// `clip_core::distill::inherit`).
    pub inherit: bool,
    /// Recorded when training starts on images without captions: the student's text tower
    /// learned nothing, so its captions are answered by the teacher's text tower (see
    /// `clip_core::distill::caption_teacher`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub images_only: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            teacher: None,
            contrastive: 1.0,
            affinity: 0.0,
            feature: 2000.0,
            teacher_dim: None,
            teacher_fingerprint: None,
            views: 4,
            inherit: true,
            images_only: false,
        }
    }
}

impl DistillConfig {
    /// Whether the student's embeddings mean something only in the teacher's space: no term
    /// compares its own images with its own captions (contrastive and affinity are off), so each
    /// side learned the teacher's embeddings through its own map, and the two sides of the
    /// student's own space were never aligned. Its embeddings are then given through the maps
    /// ([`crate::ClipModel::embed_images`]).
    pub fn in_teacher_space(&self) -> bool {
        self.teacher.is_some() && self.contrastive <= 0.0 && self.affinity <= 0.0
    }

    /// Whether the student needs linear maps into the teacher's embedding space.
    pub fn maps(&self, projection_dim: usize) -> Option<usize> {
        match (self.teacher.is_some() && self.feature > 0.0, self.teacher_dim) {
            (true, Some(d)) if d != projection_dim => Some(d),
            _ => None,
        }
    }

    /// The loss, in words (stage 4 prints it).
    pub fn describe(&self) -> String {
        let mut terms = vec![];
        if self.contrastive > 0.0 {
            terms.push(format!("{} × contrastive", self.contrastive));
        }
        if self.affinity > 0.0 {
            terms.push(format!(
                "{} × affinity (soft cross-entropy of the similarity matrices)",
                self.affinity
            ));
        }
        if self.feature > 0.0 {
            terms.push(format!(
                "{} × feature MSE (normalised embeddings, at 512 dimensions)",
                self.feature
            ));
        }
        terms.join(" + ")
    }
}

/// What turns a tower's pooled features into the shared embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// The tutorial's projection head: Linear → GELU → Linear, dropout, residual, LayerNorm.
    Mlp,
    /// CLIP's: one bias-free matrix (`visual_projection`, `text_projection`). A `clip_resnet`
    /// image tower has none: its attention pool already ends in the projection.
    Linear,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipConfig {
    /// Start from this preset and override what the file sets (only read from files).
    #[serde(skip_serializing)]
    pub preset: Option<String>,
    /// Start from a whole pretrained CLIP: a Hugging Face repo (`openai/clip-vit-base-patch32`,
    /// `laion/CLIP-ViT-B-32-laion2B-s34B-b79K`, `OFA-Sys/chinese-clip-vit-base-patch16`,
    /// optionally `@revision`) or a local folder in Hugging Face (`config.json` +
    /// `model.safetensors`) or open_clip (`open_clip_config.json` + weights) layout. Its files
    /// then set both towers, the heads, `logit_scale`, the tokenizer and the preprocessing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Branch, tag or commit of `pretrained` (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub name: String,
    pub image: ImageConfig,
    pub text: TextConfig,
    /// Size of the shared embedding space.
    pub projection_dim: usize,
    /// `mlp` (the tutorial's projection heads) or `linear` (CLIP's bias-free projections).
    pub head: HeadKind,
    /// Dropout inside the projection heads.
    pub head_dropout: f64,
    pub loss: LossKind,
    /// Temperature of the `soft` loss.
    pub temperature: f64,
    pub seed: u64,
    pub train: TrainConfig,
    pub data: DataConfig,
    /// Distillation from a teacher (`stage4-train --teacher`).
    #[serde(skip_serializing_if = "DistillConfig::is_off")]
    pub distill: DistillConfig,
}

impl DistillConfig {
    fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

/// What a config file's missing keys take: the `tiny` preset's values, which `tiny.toml` spells
/// out (a test keeps the two equal). Written here, not read from the file, because reading any
/// TOML config starts from these defaults.
impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            preset: None,
            pretrained: None,
            revision: None,
            head: HeadKind::Mlp,
            name: "tiny".into(),
            image: ImageConfig::default(),
            text: TextConfig::default(),
            projection_dim: 128,
            head_dropout: 0.1,
            loss: LossKind::Clip,
            temperature: 1.0,
            seed: 42,
            // From scratch, both towers need the heads' learning rate (the tutorial's 1e-4 / 1e-5
            // are for pretrained towers). 16 pairs per batch give enough negatives per step.
            train: TrainConfig {
                batch_size: 16,
                epochs: 40,
                lr_image: 1e-3,
                lr_text: 1e-3,
                lr_head: 1e-3,
                ..TrainConfig::default()
            },
            data: DataConfig {
                max_length: 64,
                ..DataConfig::default()
            },
            distill: DistillConfig::default(),
        }
    }
}

pub const PRESETS: [&str; 10] = [
    "tiny",
    "simple-clip",
    "simple-clip-pretrained",
    "simple-clip-pretrained-zh",
    "clip-vit-b-32",
    "clip-rn50",
    "chinese-clip-vit-b-16",
    "student-vit-s",
    "student-resnet-s",
    "student-minilm",
];

/// The presets' TOML files, built into every program: one source for each preset, the same file
/// a user can copy and edit (`--config assets/configs/NAME.toml`).
const PRESET_FILES: [(&str, &str); 10] = [
    ("tiny", include_str!("../../../assets/configs/tiny.toml")),
    ("simple-clip", include_str!("../../../assets/configs/simple-clip.toml")),
    (
        "simple-clip-pretrained",
        include_str!("../../../assets/configs/simple-clip-pretrained.toml"),
    ),
    (
        "simple-clip-pretrained-zh",
        include_str!("../../../assets/configs/simple-clip-pretrained-zh.toml"),
    ),
    (
        "clip-vit-b-32",
        include_str!("../../../assets/configs/clip-vit-b-32.toml"),
    ),
    ("clip-rn50", include_str!("../../../assets/configs/clip-rn50.toml")),
    (
        "chinese-clip-vit-b-16",
        include_str!("../../../assets/configs/chinese-clip-vit-b-16.toml"),
    ),
    (
        "student-vit-s",
        include_str!("../../../assets/configs/student-vit-s.toml"),
    ),
    (
        "student-resnet-s",
        include_str!("../../../assets/configs/student-resnet-s.toml"),
    ),
    (
        "student-minilm",
        include_str!("../../../assets/configs/student-minilm.toml"),
    ),
];

impl ClipConfig {
    /// Small enough to train on a 2-core CPU in minutes: the demo default (`tiny.toml`).
    pub fn tiny() -> Self {
        Self::builtin("tiny")
    }

    /// The tutorial's model: ResNet50 + DistilBERT base + 256-d heads, `soft` loss
    /// (`simple-clip.toml`).
    pub fn simple_clip() -> Self {
        Self::builtin("simple-clip")
    }

    /// The tutorial's own setup: timm `resnet50.a1_in1k` and `distilbert-base-uncased`, fine-tuned
    /// at 1e-4 (image) / 1e-5 (text) / 1e-3 (heads) (`simple-clip-pretrained.toml`). The
    /// architecture shown is what the repos' config.json files say; they are read again when the
    /// model is built.
    pub fn simple_clip_pretrained() -> Self {
        Self::builtin("simple-clip-pretrained")
    }

    /// As `simple-clip-pretrained`, with a text tower that reads Chinese (and 100 other
    /// languages): `distilbert-base-multilingual-cased` (`simple-clip-pretrained-zh.toml`).
    pub fn simple_clip_pretrained_zh() -> Self {
        Self::builtin("simple-clip-pretrained-zh")
    }

    /// The number of residual blocks of the image and the text tower (what `--unlocked-layers`
    /// and layer-wise decay count).
    pub fn block_counts(&self) -> (usize, usize) {
        let image = match self.image.arch {
            ImageArch::Vit => self.image.layers,
            ImageArch::Resnet | ImageArch::ClipResnet => self.image.depths.iter().sum(),
        };
        (image, self.text.n_layers)
    }

    /// This config with [`TrainConfig::pretrained_start`]'s training defaults.
    pub fn with_pretrained_start(mut self) -> Self {
        self.train = TrainConfig::pretrained_start();
        self
    }

    /// A preset that is built in: its file parses (every preset is parsed by the tests).
    fn builtin(name: &str) -> Self {
        Self::preset(name).unwrap_or_else(|e| panic!("the built-in preset {name} does not parse: {e:#}"))
    }

    /// The preset `name`, from its built-in TOML file.
    pub fn preset(name: &str) -> Result<Self> {
        let Some((_, text)) = PRESET_FILES.iter().find(|(n, _)| *n == name) else {
            bail!("unknown preset {name:?}; the presets are: {}", PRESETS.join(", "))
        };
        Self::from_toml_str(text).with_context(|| format!("in the built-in preset {name} (assets/configs/{name}.toml)"))
    }

    /// Reads a TOML config. Errors name the file, and TOML's message names the line and column.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let cfg = Self::from_toml_str(&text).with_context(|| format!("in config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        // Parse straight into the struct first: TOML's errors then name the line and column of an
        // unknown key or a wrong type.
        let direct: Self = toml::from_str(text)?;
        if direct.preset.is_none() && direct.pretrained.is_none() {
            direct.validate()?;
            return Ok(direct);
        }
        // A config may start from a preset (`preset = "simple-clip"`) and override fields; one
        // that names a `pretrained` CLIP starts from the defaults for fine-tuning one.
        let value: toml::Table = toml::from_str(text)?;
        let mut base = match value.get("preset") {
            Some(toml::Value::String(p)) => toml::Table::try_from(Self::preset(p)?)?,
            Some(_) => bail!("`preset` must be a string, one of: {}", PRESETS.join(", ")),
            None => toml::Table::try_from(Self::tiny().with_pretrained_start())?,
        };
        merge(&mut base, value);
        base.remove("preset");
        let cfg: Self = base
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", e.message()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `--config FILE` wins over `--preset NAME`; neither gives `tiny`. Pure data: a tower that
    /// names `pretrained` weights gets its architecture from the model's own config.json only
    /// when the program applies it ([`crate::pretrained::apply_configs`], with the one
    /// [`crate::hub::Hub`] it builds).
    pub fn resolve(config: Option<&Path>, preset: Option<&str>) -> Result<Self> {
        Ok(match (config, preset) {
            (Some(p), _) => Self::from_toml_file(p)?,
            (None, Some(name)) => Self::preset(name)?,
            (None, None) => Self::tiny(),
        })
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Sizes beyond any model's: each refused by name, before any arithmetic on them (the sizes
    /// come from files, and products of such sizes overflow).
    fn size_errors(&self) -> Vec<String> {
        let (i, t) = (&self.image, &self.text);
        let mut errs = vec![];
        let mut sizes = vec![
            ("image.image_size", i.image_size),
            ("image.stem_width", i.stem_width),
            ("image.stem_stride", i.stem_stride),
            ("image.stem_kernel", i.stem_kernel),
            ("image.patch_size", i.patch_size),
            ("image.width", i.width),
            ("image.heads", i.heads),
            ("image.mlp_dim", i.mlp_dim),
            ("image.output_dim", i.output_dim),
            ("text.vocab_size", t.vocab_size),
            ("text.dim", t.dim),
            ("text.n_heads", t.n_heads),
            ("text.hidden_dim", t.hidden_dim),
            ("text.max_position_embeddings", t.max_position_embeddings),
            ("text.type_vocab_size", t.type_vocab_size),
            ("projection_dim", self.projection_dim),
        ];
        if let Some(d) = self.distill.teacher_dim {
            sizes.push(("distill.teacher_dim", d));
        }
        for &w in &i.widths {
            sizes.push(("image.widths", w));
        }
        for (name, v) in sizes {
            if v > MAX_SIZE {
                errs.push(format!("{name} {v} is larger than any model's (at most {MAX_SIZE})"));
            }
        }
        if i.image_size > MAX_PREPARED_SIDE {
            errs.push(format!(
                "image.image_size {} is larger than any image clipmine prepares (at most {MAX_PREPARED_SIDE})",
                i.image_size
            ));
        }
        if let Some(r) = i.resize {
            if r > MAX_PREPARED_SIDE || r < i.image_size {
                errs.push(format!(
                    "image.resize {r} must lie between image.image_size ({}) and {MAX_PREPARED_SIDE}: the shorter side is resized to it before the centre crop",
                    i.image_size
                ));
            }
        }
        let mut blocks = vec![("image.layers", i.layers), ("text.n_layers", t.n_layers)];
        blocks.extend(i.depths.iter().map(|&d| ("image.depths", d)));
        for (name, v) in blocks {
            if v > MAX_BLOCKS {
                errs.push(format!(
                    "{name} {v} is more blocks than any model has (at most {MAX_BLOCKS})"
                ));
            }
        }
        errs
    }

    /// Checks the shapes fit together before anything is allocated, with a hint for each problem.
    pub fn validate(&self) -> Result<()> {
        let i = &self.image;
        let t = &self.text;
        let errs = self.size_errors();
        if !errs.is_empty() {
            bail!("invalid config:\n  - {}", errs.join("\n  - "));
        }
        let mut errs = vec![];
        match i.arch {
            ImageArch::Resnet => self.validate_resnet(&mut errs),
            ImageArch::Vit => {
                if i.patch_size == 0 || i.image_size < i.patch_size || !i.image_size.is_multiple_of(i.patch_size) {
                    errs.push(format!(
                        "image.image_size {} must be a multiple of image.patch_size {}",
                        i.image_size, i.patch_size
                    ));
                }
                if i.width == 0 || i.heads == 0 || !i.width.is_multiple_of(i.heads) || i.layers == 0 || i.mlp_dim == 0 {
                    errs.push(format!(
                        "image.width ({}) must be a positive multiple of image.heads ({}), and image.layers and image.mlp_dim at least 1",
                        i.width, i.heads
                    ));
                }
            }
            ImageArch::ClipResnet => {
                if i.depths.len() != 4 || i.depths.contains(&0) || i.width == 0 || i.output_dim == 0 {
                    errs.push("a clip_resnet image tower needs 4 stages of depth ≥ 1 (image.depths), image.width and image.output_dim ≥ 1".into());
                }
                if i.image_size == 0 || !i.image_size.is_multiple_of(32) {
                    errs.push(format!(
                        "image.image_size {} must be a multiple of 32 for a clip_resnet tower",
                        i.image_size
                    ));
                }
                if i.heads == 0 || !(i.width * 32).is_multiple_of(i.heads) {
                    errs.push(format!(
                        "image.heads ({}) must divide the attention pool's width {}",
                        i.heads,
                        i.width * 32
                    ));
                }
            }
        }
        if self.head == HeadKind::Linear && i.arch == ImageArch::ClipResnet && i.output_dim != self.projection_dim {
            errs.push(format!(
                "a clip_resnet tower's attention pool gives {} values, but projection_dim is {}",
                i.output_dim, self.projection_dim
            ));
        }
        if t.kind != TextKind::Clip && t.pooling == Pooling::Eot {
            errs.push(
                "text.pooling = \"eot\" is for a clip text tower; a BERT-family tower reads [CLS] or the mean".into(),
            );
        }
        if t.kind == TextKind::Clip && t.pooling != Pooling::Eot {
            errs.push(
                "a clip text tower is causal (a token sees only those before it): use text.pooling = \"eot\"".into(),
            );
        }
        if t.dim == 0 || t.n_heads == 0 || !t.dim.is_multiple_of(t.n_heads) {
            errs.push(format!(
                "text.dim ({}) must be a positive multiple of text.n_heads ({})",
                t.dim, t.n_heads
            ));
        }
        if t.vocab_size < 8 {
            errs.push(format!(
                "text.vocab_size {} is too small (it must hold the special tokens)",
                t.vocab_size
            ));
        }
        for (c, name) in i.std.iter().zip(["R", "G", "B"]) {
            if !(*c > 0.0 && c.is_finite()) {
                errs.push(format!("image.std must be positive (channel {name} is {c})"));
            }
        }
        if !(i.crop_pct > 0.0 && i.crop_pct <= 1.0) {
            errs.push(format!("image.crop_pct must be in (0, 1] (got {})", i.crop_pct));
        }
        if !(t.layer_norm_eps > 0.0 && t.layer_norm_eps < 1.0) {
            errs.push(format!(
                "text.layer_norm_eps must be in (0, 1) (got {})",
                t.layer_norm_eps
            ));
        }
        if t.kind == TextKind::Bert && t.type_vocab_size == 0 {
            errs.push("text.type_vocab_size must be at least 1 for a BERT text tower".into());
        }
        if t.n_layers == 0 || t.hidden_dim == 0 || t.max_position_embeddings < 2 {
            errs.push("text.n_layers, text.hidden_dim must be ≥ 1 and text.max_position_embeddings ≥ 2".into());
        }
        if self.projection_dim == 0 {
            errs.push("projection_dim must be at least 1".into());
        }
        for (name, p) in [
            ("head_dropout", self.head_dropout),
            ("text.dropout", t.dropout),
            ("text.attention_dropout", t.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                errs.push(format!("{name} must be in [0, 1) (got {p})"));
            }
        }
        if self.temperature <= 0.0 {
            errs.push("temperature must be positive".into());
        }
        let tr = &self.train;
        if tr.batch_size < 2 {
            errs.push(format!(
                "train.batch_size must be at least 2 (contrastive loss compares pairs in a batch; got {})",
                tr.batch_size
            ));
        }
        if tr.epochs == 0 {
            errs.push("train.epochs must be at least 1".into());
        }
        if tr.micro_batch > 0 && !tr.batch_size.is_multiple_of(tr.micro_batch) {
            errs.push(format!(
                "train.micro_batch ({}) must divide train.batch_size ({}): every micro-batch of a batch is the same size",
                tr.micro_batch, tr.batch_size
            ));
        }
        if tr.accumulate == 0 {
            errs.push("train.accumulate must be at least 1".into());
        }
        for (name, lr) in [
            ("lr_image", tr.lr_image),
            ("lr_text", tr.lr_text),
            ("lr_head", tr.lr_head),
        ] {
            if !(lr >= 0.0 && lr.is_finite()) {
                errs.push(format!("train.{name} must be a finite number ≥ 0 (got {lr})"));
            }
        }
        if !(tr.layer_decay > 0.0 && tr.layer_decay <= 1.0) {
            errs.push(format!(
                "train.layer_decay must be in (0, 1] (got {}; 1 is off)",
                tr.layer_decay
            ));
        }
        if !(0.0..1.0).contains(&tr.warmup_share) {
            errs.push(format!(
                "train.warmup_share must be in [0, 1) (got {})",
                tr.warmup_share
            ));
        }
        for (lock, freeze, tower) in [
            (tr.lock_image, tr.freeze_image, "image"),
            (tr.lock_text, tr.freeze_text, "text"),
        ] {
            if lock && freeze {
                errs.push(format!(
                    "train.lock_{tower} and train.freeze_{tower} both set: freeze fixes the whole {tower} tower (and caches its features), lock keeps its last unlocked_layers blocks training — choose one"
                ));
            }
        }
        let blocks = self.block_counts();
        for (lock, n, tower) in [(tr.lock_image, blocks.0, "image"), (tr.lock_text, blocks.1, "text")] {
            if lock && tr.unlocked_layers > n {
                errs.push(format!(
                    "train.unlocked_layers is {} but the {tower} tower has {n} blocks",
                    tr.unlocked_layers
                ));
            }
        }
        let d = &self.distill;
        for (name, w) in [
            ("contrastive", d.contrastive),
            ("affinity", d.affinity),
            ("feature", d.feature),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                errs.push(format!("distill.{name} must be a finite weight ≥ 0 (got {w})"));
            }
        }
        if d.teacher.is_some() && d.contrastive + d.affinity + d.feature <= 0.0 {
            errs.push(
                "distillation with every loss weight 0 (distill.contrastive, affinity, feature) learns nothing".into(),
            );
        }
        if d.teacher.is_some() && self.data.augment && !(1..=64).contains(&d.views) {
            errs.push(format!(
                "distill.views must be from 1 to 64 with augmentation (got {}): the teacher embeds that many crops of every image",
                d.views
            ));
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            errs.push(format!(
                "data.val_fraction must be in [0, 1) (got {})",
                self.data.val_fraction
            ));
        }
        if self.data.max_length < 2 {
            errs.push("data.max_length must be at least 2 ([CLS] and [SEP])".into());
        }
        if !errs.is_empty() {
            bail!("invalid config:\n  - {}", errs.join("\n  - "));
        }
        Ok(())
    }

    /// The ResNet image tower's shape checks.
    fn validate_resnet(&self, errs: &mut Vec<String>) {
        let i = &self.image;
        if i.depths.is_empty() || i.depths.len() != i.widths.len() {
            errs.push(format!(
                "image.depths ({:?}) and image.widths ({:?}) must be non-empty and of the same length (one entry per stage)",
                i.depths, i.widths
            ));
        }
        if i.depths.contains(&0) || i.widths.contains(&0) || i.stem_width == 0 {
            errs.push("image depths and widths must all be at least 1".into());
        }
        if i.stem_kernel == 0 || i.stem_kernel.is_multiple_of(2) {
            errs.push(format!("image.stem_kernel must be odd (got {})", i.stem_kernel));
        }
        if i.stem_stride == 0 {
            errs.push("image.stem_stride must be at least 1".into());
        }
        // Saturating: the sizes come from a file, and a huge stride or 70 stages must be an error
        // message, not an overflow.
        let stages = 1usize
            .checked_shl(i.depths.len().saturating_sub(1) as u32)
            .unwrap_or(usize::MAX);
        let reduction = i
            .stem_stride
            .max(1)
            .saturating_mul(if i.stem_pool { 2 } else { 1 })
            .saturating_mul(stages);
        if i.image_size < reduction {
            errs.push(format!(
                "image.image_size {} is smaller than the ResNet's total stride {} (stem × pool × stages): use larger images or fewer stages",
                i.image_size, reduction
            ));
        }
    }

    /// Longest tokenised caption the model accepts.
    pub fn max_tokens(&self) -> usize {
        self.data.max_length.min(self.text.max_position_embeddings)
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
