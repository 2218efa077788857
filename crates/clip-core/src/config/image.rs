//! The image tower's section (`[image]`): its architecture, its shape and how photos are prepared
//! for it.

use serde::{Deserialize, Serialize};

use super::{too_large, too_many_blocks, Activation, MAX_PREPARED_SIDE};

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

impl ImageConfig {
    /// Sizes beyond any model's: each refused by name, before any arithmetic on them (the sizes
    /// come from files, and products of such sizes overflow).
    pub(super) fn check_sizes(&self, errs: &mut Vec<String>) {
        let mut sizes = vec![
            ("image.image_size", self.image_size),
            ("image.stem_width", self.stem_width),
            ("image.stem_stride", self.stem_stride),
            ("image.stem_kernel", self.stem_kernel),
            ("image.patch_size", self.patch_size),
            ("image.width", self.width),
            ("image.heads", self.heads),
            ("image.mlp_dim", self.mlp_dim),
            ("image.output_dim", self.output_dim),
        ];
        sizes.extend(self.widths.iter().map(|&w| ("image.widths", w)));
        too_large(errs, &sizes);
        if self.image_size > MAX_PREPARED_SIDE {
            errs.push(format!(
                "image.image_size {} is larger than any image clipmine prepares (at most {MAX_PREPARED_SIDE})",
                self.image_size
            ));
        }
        if let Some(r) = self.resize {
            if r > MAX_PREPARED_SIDE || r < self.image_size {
                errs.push(format!(
                    "image.resize {r} must lie between image.image_size ({}) and {MAX_PREPARED_SIDE}: the shorter side is resized to it before the centre crop",
                    self.image_size
                ));
            }
        }
        let mut blocks = vec![("image.layers", self.layers)];
        blocks.extend(self.depths.iter().map(|&d| ("image.depths", d)));
        too_many_blocks(errs, &blocks);
    }

    /// The tower's shape checks (by architecture) and the preprocessing's.
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        match self.arch {
            ImageArch::Resnet => self.validate_resnet(errs),
            ImageArch::Vit => self.validate_vit(errs),
            ImageArch::ClipResnet => self.validate_clip_resnet(errs),
        }
        for (c, name) in self.std.iter().zip(["R", "G", "B"]) {
            if !(*c > 0.0 && c.is_finite()) {
                errs.push(format!("image.std must be positive (channel {name} is {c})"));
            }
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            errs.push(format!("image.crop_pct must be in (0, 1] (got {})", self.crop_pct));
        }
    }

    /// The ResNet image tower's shape checks.
    fn validate_resnet(&self, errs: &mut Vec<String>) {
        let i = self;
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

    /// The Vision Transformer's shape checks.
    fn validate_vit(&self, errs: &mut Vec<String>) {
        let i = self;
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

    /// OpenAI's ModifiedResNet's shape checks.
    fn validate_clip_resnet(&self, errs: &mut Vec<String>) {
        let i = self;
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
