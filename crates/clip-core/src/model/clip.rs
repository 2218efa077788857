use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Result;
use candle_core::{Device, ModuleT, Tensor};

use super::{ProjectionHead, ResNet, TextEncoder};
use crate::config::{ClipConfig, LossKind};
use crate::loss;
use crate::nn::DropoutRng;
use crate::params::{Group, Init, ParamStore};

/// Embeddings of a batch of pairs, each (B, projection_dim).
pub struct Embeddings {
    pub image: Tensor,
    pub text: Tensor,
}

/// The whole model. Parameter names follow the tutorial's PyTorch `CLIPModel`:
/// `image_encoder.model.*` (timm ResNet), `text_encoder.model.*` (HF DistilBERT or BERT),
/// `image_projection.*`, `text_projection.*`, and `logit_scale` for the `clip` loss.
pub struct ClipModel {
    pub config: ClipConfig,
    pub params: ParamStore,
    image_encoder: ResNet,
    text_encoder: TextEncoder,
    image_projection: ProjectionHead,
    text_projection: ProjectionHead,
    logit_scale: Option<Tensor>,
    dropout_rng: DropoutRng,
    cut: AtomicU8,
}

/// A tower whose output can be cut from the graph on purpose (stage 3's `--cut-gradient`), to see
/// the gradient check name every variable upstream of the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

impl ClipModel {
    /// Builds a randomly initialised model; the same config and seed give the same weights.
    pub fn new(config: &ClipConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let params = ParamStore::new(device, config.seed);
        let dropout_rng = DropoutRng::new(config.seed ^ 0x5eed);
        let tr = &config.train;
        let image_encoder = ResNet::new(
            &params
                .root(Group::ImageTower, !tr.freeze_image)
                .pp("image_encoder")
                .pp("model"),
            &config.image,
        )?;
        let text_encoder = TextEncoder::new(
            &params
                .root(Group::TextTower, !tr.freeze_text)
                .pp("text_encoder")
                .pp("model"),
            &config.text,
            &dropout_rng,
        )?;
        let heads = params.root(Group::Heads, true);
        let p = config.projection_dim;
        let image_projection = ProjectionHead::new(
            &heads.pp("image_projection"),
            config.image.feature_dim(),
            p,
            config.head_dropout,
            &dropout_rng,
        )?;
        let text_projection = ProjectionHead::new(
            &heads.pp("text_projection"),
            config.text.dim,
            p,
            config.head_dropout,
            &dropout_rng,
        )?;
        let logit_scale = match config.loss {
            LossKind::Clip => Some(heads.param("logit_scale", &[], Init::Const(loss::CLIP_INIT_LOGIT_SCALE))?),
            LossKind::Soft => None,
        };
        Ok(Self {
            config: config.clone(),
            params,
            image_encoder,
            text_encoder,
            image_projection,
            text_projection,
            logit_scale,
            dropout_rng,
            cut: AtomicU8::new(0),
        })
    }

    /// The image tower alone (pooled features before the head).
    pub fn image_tower(&self) -> &ResNet {
        &self.image_encoder
    }

    /// The text tower alone (pooled states before the head).
    pub fn text_tower(&self) -> &TextEncoder {
        &self.text_encoder
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Reseeds every dropout layer; the trainer calls it once per step so runs are repeatable.
    pub fn reseed_dropout(&self, seed: u64) {
        self.dropout_rng.reseed(seed)
    }

    /// Detaches a tower's output from the graph (a deliberate bug, for demonstrating the checks).
    pub fn cut_gradient(&self, tower: Option<Tower>) {
        let v = match tower {
            None => 0,
            Some(Tower::Image) => 1,
            Some(Tower::Text) => 2,
        };
        self.cut.store(v, Ordering::Relaxed);
    }

    fn is_cut(&self, tower: Tower) -> bool {
        let v = self.cut.load(Ordering::Relaxed);
        (v == 1 && tower == Tower::Image) || (v == 2 && tower == Tower::Text)
    }

    /// Images (B, 3, S, S), normalised → embeddings (B, P).
    pub fn encode_image(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut features = self.image_encoder.forward_t(images, train)?;
        if self.is_cut(Tower::Image) {
            features = features.detach();
        }
        Ok(self.image_projection.forward_t(&features, train)?)
    }

    /// Token ids and attention mask (B, L) → embeddings (B, P).
    pub fn encode_text(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        let mut cls = self.text_encoder.forward(input_ids, attention_mask, train)?;
        if self.is_cut(Tower::Text) {
            cls = cls.detach();
        }
        Ok(self.text_projection.forward_t(&cls, train)?)
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

    /// The configured contrastive loss of a batch of embeddings. `positives` (B×B) marks pairs
    /// that share an image or a caption (see [`loss::clip_loss`]); the `soft` loss ignores it.
    pub fn loss(&self, e: &Embeddings, positives: Option<&Tensor>) -> Result<Tensor> {
        match (self.config.loss, &self.logit_scale) {
            (LossKind::Clip, Some(s)) => loss::clip_loss(&e.image, &e.text, s, positives),
            _ => loss::soft_loss(&e.image, &e.text, self.config.temperature),
        }
    }

    /// The current logit scale exp(s) of the `clip` loss, if any.
    pub fn logit_scale(&self) -> Result<Option<f32>> {
        Ok(match &self.logit_scale {
            Some(s) => Some(s.clamp(0.0, loss::CLIP_MAX_LOGIT_SCALE)?.exp()?.to_scalar::<f32>()?),
            None => None,
        })
    }
}
