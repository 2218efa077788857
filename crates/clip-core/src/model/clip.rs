use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use candle_core::{Device, ModuleT, Tensor};

use super::{Head, ImageTower, TextTower};
use crate::config::{ClipConfig, HeadKind, ImageArch, LossKind};
use crate::data::Batch;
use crate::loss;
use crate::nn::DropoutRng;
use crate::params::{Group, Init, ParamStore};

/// Embeddings of a batch of pairs, each (B, projection_dim).
#[derive(Clone)]
pub struct Embeddings {
    pub image: Tensor,
    pub text: Tensor,
}

/// How many values (parameters and buffers) a model has, per group ([`ClipModel::size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSize {
    pub image: u64,
    pub text: u64,
    pub heads: u64,
}

impl ModelSize {
    pub fn total(&self) -> u64 {
        self.image.saturating_add(self.text).saturating_add(self.heads)
    }
}

/// The whole model. Parameter names follow the tutorial's PyTorch `CLIPModel`:
/// `image_encoder.model.*` (timm ResNet), `text_encoder.model.*` (HF DistilBERT or BERT),
/// `image_projection.*`, `text_projection.*`, and `logit_scale` for the `clip` loss.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use clip_core::{ClipConfig, ClipModel};
///
/// let cfg = ClipConfig::tiny();
/// let model = ClipModel::new(&cfg, &Device::Cpu)?;
/// let images = Tensor::randn(0f32, 1f32, (2, 3, 64, 64), &Device::Cpu)?;
/// let ids = Tensor::new(&[[2u32, 17, 40, 3], [2, 9, 3, 0]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu)?;
/// let e = model.forward(&images, &ids, &mask, true)?;
/// assert_eq!((e.image.dims(), e.text.dims()), ([2, 128].as_slice(), [2, 128].as_slice()));
/// // The contrastive loss reaches every trainable tensor of both towers and the heads.
/// let grads = model.loss(&e, None)?.backward()?;
/// for (name, entry) in model.params.entries().into_iter().filter(|(_, e)| e.is_trainable()) {
///     assert!(grads.get(entry.var.as_tensor()).is_some(), "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
pub struct ClipModel {
    pub config: ClipConfig,
    pub params: ParamStore,
    image_encoder: ImageTower,
    text_encoder: TextTower,
    image_projection: Head,
    text_projection: Head,
    logit_scale: Option<Tensor>,
    /// Linear maps (image, text) from this model's embedding width to a distillation teacher's,
    /// when they differ (`distill.feature`); trained with the rest, unused at prediction.
    teacher_maps: Option<(crate::nn::Linear, crate::nn::Linear)>,
    dropout_rng: DropoutRng,
    /// Batches each tower has run on (image, text): evidence that cached features replace it.
    tower_calls: [AtomicUsize; 2],
}

impl ClipModel {
    /// Builds a randomly initialised model; the same config and seed give the same weights.
    ///
    /// The sizes come from files (a checkpoint's config.json, a run's config.toml): the model is
    /// first sized without allocating ([`ClipModel::size`]), and one whose parameters would not
    /// fit the machine's memory is refused with its size in GB ([`crate::params::check_memory`]).
    pub fn new(config: &ClipConfig, device: &Device) -> Result<Self> {
        let size = Self::size(config)?;
        crate::params::check_memory(size.total(), "the model's parameters")
            .with_context(|| format!("building the model of config {:?}", config.name))?;
        let mut params = ParamStore::new(device, config.seed);
        let tr = &config.train;
        if tr.lock_image || tr.lock_text {
            let cfg = config.clone();
            params = params.with_lock(std::sync::Arc::new(move |name: &str| {
                super::blocks::is_locked(&cfg, &cfg.train, name)
            }));
        }
        Self::build(config, params)
    }

    /// The number of values (parameters and buffers) of the model `config` describes, per group,
    /// counted without allocating them: the config is validated, every count is checked for
    /// overflow.
    pub fn size(config: &ClipConfig) -> Result<ModelSize> {
        config.validate()?;
        let store = ParamStore::sizing();
        Self::build(config, store.clone())?;
        Ok(ModelSize {
            image: store.created(Group::ImageTower),
            text: store.created(Group::TextTower),
            heads: store.created(Group::Heads),
        })
    }

    fn build(config: &ClipConfig, params: ParamStore) -> Result<Self> {
        let dropout_rng = DropoutRng::new(config.seed ^ 0x5eed);
        let tr = &config.train;
        let image_encoder = ImageTower::new(
            &params
                .root(Group::ImageTower, !tr.freeze_image)
                .pp("image_encoder")
                .pp("model"),
            &config.image,
        )?;
        let text_encoder = TextTower::new(
            &params
                .root(Group::TextTower, !tr.freeze_text)
                .pp("text_encoder")
                .pp("model"),
            &config.text,
            &dropout_rng,
        )?;
        let heads = params.root(Group::Heads, true);
        let p = config.projection_dim;
        // A clip_resnet's attention pool already ends in CLIP's projection.
        let image_projection = if config.head == HeadKind::Linear && config.image.arch == ImageArch::ClipResnet {
            Head::Identity
        } else {
            Head::new(
                &heads.pp("image_projection"),
                config.head,
                config.image.feature_dim(),
                p,
                config.head_dropout,
                &dropout_rng,
            )?
        };
        let text_projection = Head::new(
            &heads.pp("text_projection"),
            config.head,
            config.text.dim,
            p,
            config.head_dropout,
            &dropout_rng,
        )?;
        let logit_scale = match config.loss {
            LossKind::Clip => Some(heads.param("logit_scale", &[], Init::Const(loss::CLIP_INIT_LOGIT_SCALE))?),
            LossKind::Soft => None,
        };
        let teacher_maps = match config.distill.maps(p) {
            Some(d) => {
                let maps = heads.pp("distill");
                let std = 1.0 / (p as f64).sqrt();
                let map = |name: &str| -> Result<crate::nn::Linear> {
                    let w = maps.pp(name).param("weight", &[d, p], Init::Normal { std })?;
                    Ok(crate::nn::Linear::bias_free(w)?)
                };
                Some((map("image_map")?, map("text_map")?))
            }
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            params,
            image_encoder,
            text_encoder,
            image_projection,
            text_projection,
            logit_scale,
            teacher_maps,
            dropout_rng,
            tower_calls: Default::default(),
        })
    }

    /// The image tower alone (pooled features before the head).
    pub fn image_tower(&self) -> &ImageTower {
        &self.image_encoder
    }

    /// The text tower alone (pooled states before the head).
    pub fn text_tower(&self) -> &TextTower {
        &self.text_encoder
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Reseeds every dropout layer; the trainer calls it once per step so runs are repeatable.
    pub fn reseed_dropout(&self, seed: u64) {
        self.dropout_rng.reseed(seed)
    }

    /// Whether the image tower is frozen: then it runs in evaluation mode even while training
    /// (BatchNorm uses and keeps its running statistics) and gets no gradient.
    pub fn image_frozen(&self) -> bool {
        self.config.train.freeze_image
    }

    /// Whether the text tower is frozen: then it runs in evaluation mode (no dropout) even while
    /// training and gets no gradient.
    pub fn text_frozen(&self) -> bool {
        self.config.train.freeze_text
    }

    /// Batches the (image, text) towers have run on since the model was built.
    pub fn tower_calls(&self) -> (usize, usize) {
        (
            self.tower_calls[0].load(Ordering::Relaxed),
            self.tower_calls[1].load(Ordering::Relaxed),
        )
    }

    /// Images (B, 3, S, S), normalised → pooled image-tower features (B, D), before the head.
    /// A frozen tower runs in evaluation mode whatever `train` says.
    pub fn image_features(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        self.tower_calls[0].fetch_add(1, Ordering::Relaxed);
        if self.image_frozen() {
            // A frozen tower needs no graph: its activations are freed as it goes.
            return crate::nn::no_grad(|| Ok(self.image_encoder.forward_t(images, false)?.detach()));
        }
        Ok(self.image_encoder.forward_t(images, train)?)
    }

    /// Token ids and attention mask (B, L) → pooled text-tower features (B, dim), before the
    /// head. A frozen tower runs in evaluation mode whatever `train` says.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        self.tower_calls[1].fetch_add(1, Ordering::Relaxed);
        if self.text_frozen() {
            return crate::nn::no_grad(|| Ok(self.text_encoder.forward(input_ids, attention_mask, false)?.detach()));
        }
        Ok(self.text_encoder.forward(input_ids, attention_mask, train)?)
    }

    /// Pooled image features (B, D) → embeddings (B, P).
    pub fn project_image(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.image_projection.forward_t(features, train)?)
    }

    /// Pooled text features (B, dim) → embeddings (B, P).
    pub fn project_text(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.text_projection.forward_t(features, train)?)
    }

    /// Images (B, 3, S, S), normalised → embeddings (B, P).
    pub fn encode_image(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        crate::nn::on_compute_pool(|| self.project_image(&self.image_features(images, train)?, train))
    }

    /// Token ids and attention mask (B, L) → embeddings (B, P).
    pub fn encode_text(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        crate::nn::on_compute_pool(|| self.project_text(&self.text_features(input_ids, attention_mask, train)?, train))
    }

    /// Image embeddings for search and evaluation: evaluation mode, and no graph for a backward
    /// pass ([`crate::nn::no_grad`]), so each activation is freed once read; the output is
    /// detached.
    ///
    /// A student distilled with the feature term alone answers in its teacher's space (see
    /// [`crate::config::DistillConfig::in_teacher_space`]): its embeddings go through the maps.
    pub fn embed_images(&self, images: &Tensor) -> Result<Tensor> {
        crate::nn::no_grad(|| Ok(self.answer_image(&self.encode_image(images, false)?)?.detach()))
    }

    /// Caption embeddings for search and evaluation (see [`ClipModel::embed_images`]).
    pub fn embed_texts(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        crate::nn::no_grad(|| {
            let e = self.encode_text(input_ids, attention_mask, false)?;
            Ok(self.answer_text(&e)?.detach())
        })
    }

    /// An image embedding (B, P) as the model answers with it: in the teacher's space when it
    /// only means something there (a student distilled by the feature term alone), else as is.
    pub fn answer_image(&self, e: &Tensor) -> Result<Tensor> {
        self.answer(e, |(image, _)| image)
    }

    /// A caption embedding as the model answers with it (see [`ClipModel::answer_image`]).
    pub fn answer_text(&self, e: &Tensor) -> Result<Tensor> {
        self.answer(e, |(_, text)| text)
    }

    /// `e` through the map `pick` chooses, for a student that answers in its teacher's space.
    fn answer(
        &self,
        e: &Tensor,
        pick: impl Fn(&(crate::nn::Linear, crate::nn::Linear)) -> &crate::nn::Linear,
    ) -> Result<Tensor> {
        use candle_core::Module;
        match &self.teacher_maps {
            Some(maps) if self.config.distill.in_teacher_space() => Ok(pick(maps).forward(e)?),
            _ => Ok(e.clone()),
        }
    }

    /// The width of the embeddings [`ClipModel::embed_images`] gives: the teacher's for a
    /// student that answers in its space, else `projection_dim`.
    pub fn embed_dim(&self) -> usize {
        match (&self.teacher_maps, self.config.distill.teacher_dim) {
            (Some(_), Some(d)) if self.config.distill.in_teacher_space() => d,
            _ => self.config.projection_dim,
        }
    }

    pub fn forward(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Embeddings> {
        Ok(Embeddings {
            image: self.encode_image(images, train)?,
            text: self.encode_text(input_ids, attention_mask, train)?,
        })
    }

    /// Embeddings of a batch: a tower whose cached features the batch carries is not run (its
    /// features go straight to the head); the others run as in [`ClipModel::forward`].
    pub fn forward_batch(&self, b: &Batch, train: bool) -> Result<Embeddings> {
        // Features stand in for a tower only while its weights cannot change.
        if (b.image_features.is_some() && !self.image_frozen()) || (b.text_features.is_some() && !self.text_frozen()) {
            anyhow::bail!(
                "a batch carries cached features of a tower that is not frozen: they would go stale as it trains"
            );
        }
        let image = match &b.image_features {
            Some(f) => self.project_image(f, train)?,
            None => self.encode_image(&b.images, train)?,
        };
        let text = match &b.text_features {
            Some(f) => self.project_text(f, train)?,
            None => self.encode_text(&b.input_ids, &b.attention_mask, train)?,
        };
        Ok(Embeddings { image, text })
    }

    /// The configured contrastive loss of a batch of embeddings. `positives` (B×B) marks pairs
    /// that share an image or a caption (see [`loss::clip_loss`]); the `soft` loss ignores it.
    pub fn loss(&self, e: &Embeddings, positives: Option<&Tensor>) -> Result<Tensor> {
        match (self.config.loss, &self.logit_scale) {
            (LossKind::Clip, Some(s)) => loss::clip_loss(&e.image, &e.text, s, positives),
            _ => loss::soft_loss(&e.image, &e.text, self.config.temperature),
        }
    }

    /// Clamps the learnable `logit_scale` to [0, ln 100] in place, as open_clip does after every
    /// optimiser step: beyond it the loss's own clamp would hold the scale with a zero gradient
    /// while the parameter drifted on. Returns whether it had to.
    pub fn clamp_logit_scale(&self) -> Result<bool> {
        let Some(e) = self.params.get("logit_scale") else {
            return Ok(false);
        };
        let v = e
            .var
            .as_tensor()
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let c = v.clamp(0.0, loss::CLIP_MAX_LOGIT_SCALE as f32);
        if c == v {
            return Ok(false);
        }
        e.var.set(&Tensor::new(c, self.device())?)?;
        Ok(true)
    }

    /// The learnable `logit_scale` (its log) of the `clip` loss, if any, in the graph.
    pub fn logit_scale_param(&self) -> Option<&Tensor> {
        self.logit_scale.as_ref()
    }

    /// Embeddings mapped into a distillation teacher's space: through the learned linear maps
    /// when the widths differ, else as they are.
    pub fn to_teacher_space(&self, e: &Embeddings) -> Result<Embeddings> {
        use candle_core::Module;
        Ok(match &self.teacher_maps {
            Some((i, t)) => Embeddings {
                image: i.forward(&e.image)?,
                text: t.forward(&e.text)?,
            },
            None => e.clone(),
        })
    }

    /// An image embedding in the teacher's space: through the image map where the widths differ.
    pub fn image_to_teacher_space(&self, image: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        Ok(match &self.teacher_maps {
            Some((i, _)) => i.forward(image)?,
            None => image.clone(),
        })
    }

    /// The current logit scale exp(s) of the `clip` loss, if any.
    pub fn logit_scale(&self) -> Result<Option<f32>> {
        Ok(match &self.logit_scale {
            Some(s) => Some(s.clamp(0.0, loss::CLIP_MAX_LOGIT_SCALE)?.exp()?.to_scalar::<f32>()?),
            None => None,
        })
    }
}
