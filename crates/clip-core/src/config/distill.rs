//! The distillation section (`[distill]`): the teacher and the weight of each loss term.

use serde::{Deserialize, Serialize};

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

impl DistillConfig {
    /// Whether nothing differs from the default (the section is then not written).
    pub(super) fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

impl DistillConfig {
    /// The loss weights' checks (the number of views, which depends on augmentation, is
    /// [`super::ClipConfig::validate`]'s).
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        let d = self;
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
    }
}
