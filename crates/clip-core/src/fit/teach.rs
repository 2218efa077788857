//! Distillation: the teacher's part of a run (its targets, the student's start from its
//! weights, the agreement between the two) and the loss of a step that distils.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::Trainer;
use crate::config::DistillConfig;
use crate::data::{Batch, Dataset};
use crate::distill::Targets;
use crate::model::{ClipModel, Embeddings};
use crate::train::{Objective, Pairs};

impl Trainer {
    /// Distils from a teacher whose embeddings of this dataset are `targets`
    /// ([`crate::distill::targets`]): each step's loss adds its terms ([`crate::distill::loss`]).
    pub fn set_teacher(&mut self, targets: crate::distill::Targets) -> Result<()> {
        if self.images_only() {
            if let Some(why) = crate::distill::images_only_refusal(&self.cfg.distill) {
                bail!("{}: {why}", self.data.dataset.root.display());
            }
        }
        if self.cfg.data.augment && targets.views.is_empty() {
            bail!(
                "training with augmentation, and the teacher embedded no augmented views: the student would learn the teacher's embedding of each image as it is from a random crop of it (compute the targets with views = distill.views)"
            );
        }
        self.teacher = Some(Arc::new(targets));
        Ok(())
    }

    /// Keeps the end-of-run comparison of teacher and student in the state and metrics.json.
    pub fn set_distillation(&mut self, summary: crate::distill::Summary) -> Result<()> {
        self.state.distillation = Some(summary);
        self.write_metrics()
    }

    /// Whether the data is images without captions ([`crate::data::Dataset::captionless`]): then
    /// only a teacher can train, and only the image tower (see [`crate::distill::image_loss`]).
    pub fn images_only(&self) -> bool {
        self.data.dataset.captionless()
    }

    /// Starts a new run's student from the teacher's weights ([`crate::distill::inherit`]) and
    /// rewrites the run's starting weights with them. Refused once training has begun.
    /// The token table too when `tokenizer` (the teacher's) is the student's.
    pub fn inherit_from(
        &mut self,
        teacher: &ClipModel,
        tokenizer: &crate::data::TextTokenizer,
    ) -> Result<crate::distill::Inherited> {
        if self.state.epoch > 0 || self.state.partial.is_some() || self.opt.step > 0 {
            bail!("weights are inherited only before the first step of a new run");
        }
        let same = tokenizer.to_json()? == self.data.tokenizer.to_json()?;
        let report = crate::distill::inherit(&self.model, teacher, same)?;
        self.start_files()?;
        Ok(report)
    }

    pub fn teacher(&self) -> Option<&crate::distill::Targets> {
        self.teacher.as_deref()
    }

    /// Measures the agreement with the teacher before the first step and keeps it in the run's
    /// state and metrics.json: stage 4's distillation gate compares the end with it.
    /// Without a teacher, nothing is measured or written (metrics.json and loss.csv appear with
    /// the first epoch, as they always have).
    pub fn measure_agreement_start(&mut self) -> Result<Option<f64>> {
        if self.teacher.is_none() {
            return Ok(None);
        }
        let a = self.teacher_agreement()?;
        self.state.agreement_start = a;
        self.write_metrics()?;
        Ok(a)
    }

    /// Top-1 agreement with the teacher on the validation split (see [`crate::distill::agreement`]).
    /// For images without captions, the top-1 neighbour agreement instead
    /// ([`crate::distill::neighbour_agreement`]).
    pub fn teacher_agreement(&self) -> Result<Option<f64>> {
        let Some(t) = &self.teacher else { return Ok(None) };
        let ds = &self.data.dataset;
        let val = &self.data.split.val;
        let mut images: Vec<usize> = val.iter().map(|&p| ds.pairs[p].image).collect();
        images.sort_unstable();
        images.dedup();
        if ds.captionless() {
            let dev = &self.data.device;
            let (si, ti) = (self.embed_images(&images)?, t.image.tensor(&images, dev)?);
            // The student's own space: the neighbours its users will get from image search.
            return Ok(Some(crate::distill::neighbour_agreement(&si, &ti)?));
        }
        // One pair per distinct caption.
        let mut seen = std::collections::HashSet::new();
        let captions: Vec<usize> = val
            .iter()
            .copied()
            .filter(|&p| seen.insert(ds.pairs[p].caption.as_str()))
            .collect();
        let dev = &self.data.device;
        let (si, st) = (self.embed_images(&images)?, self.embed_captions(&captions)?);
        let (ti, tt) = (t.image.tensor(&images, dev)?, t.text.tensor(&captions, dev)?);
        Ok(Some(crate::distill::agreement(&si, &st, &ti, &tt)?))
    }
}

/// The loss of a step that distils from `targets`: the student's contrastive loss plus the
/// teacher's terms ([`crate::distill::loss`]), or for images without captions the feature term
/// alone ([`crate::distill::image_loss`]).
pub(super) struct Distilling<'a> {
    pub targets: &'a Targets,
    pub dataset: &'a Dataset,
    pub cfg: &'a DistillConfig,
    /// This epoch's augmented view of every image, when the teacher embedded views.
    pub view: Option<usize>,
    pub device: &'a Device,
}

impl Objective for Distilling<'_> {
    fn embed(&self, m: &ClipModel, b: &Batch) -> Result<Vec<Tensor>> {
        if self.dataset.captionless() {
            let image = match &b.image_features {
                Some(f) => m.project_image(f, true)?,
                None => m.encode_image(&b.images, true)?,
            };
            return Ok(vec![image]);
        }
        let e = m.forward_batch(b, true)?;
        Ok(vec![e.image, e.text])
    }

    fn loss(&self, m: &ClipModel, e: &[Tensor], b: Pairs<'_>) -> Result<Tensor> {
        let (ti, tt) = self.targets.batch(self.dataset, b.pairs, self.view, self.device)?;
        if self.dataset.captionless() {
            return Ok(crate::distill::image_loss(m, &e[0], &ti, self.cfg)?.total);
        }
        let e = Embeddings {
            image: e[0].clone(),
            text: e[1].clone(),
        };
        let scale = self.targets.logit_scale;
        Ok(crate::distill::loss(m, &e, Some(b.positives), (&ti, &tt), scale, self.cfg)?.total)
    }
}
