//! The model a command uses: a stage 4 run or a pretrained CLIP, with its tokenizer, the teacher
//! that answers a student's captions, and the id an index records of it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clip_core::config::LossKind;
use clip_core::data::TextTokenizer;
use clip_core::distill::Teacher;
use clip_core::embed::embed_texts;
use clip_core::hub::Hub;
use clip_core::index::{files_fingerprint, model_fingerprint, ImageIndex};
/// Where a loaded model came from: a run folder, or a pretrained CLIP as its files give it.
pub(crate) use clip_core::model_source::Origin;
use clip_core::model_source::{open_model, ModelSpec, OpenedModel};
use clip_core::ClipModel;

use crate::ModelChoice;

pub(crate) struct Loaded {
    pub origin: Origin,
    pub model: ClipModel,
    pub tok: TextTokenizer,
    /// For a student distilled on images alone: the teacher whose text tower answers its
    /// captions ([`clip_core::distill::caption_teacher`]).
    pub captions_by: Option<Teacher>,
    /// exp(logit scale) for the clip loss; 1/T for the soft loss (whose logits are raw dot products).
    pub scale: f32,
}

impl Loaded {
    /// The model and tokenizer that embed captions: the teacher's for a student distilled on
    /// images alone, else the model's own.
    pub fn text_side(&self) -> (&ClipModel, &TextTokenizer) {
        match &self.captions_by {
            Some(t) => (&t.model, &t.tokenizer),
            None => (&self.model, &self.tok),
        }
    }

    /// Caption embeddings (N, P), as the model answers them ([`Loaded::text_side`]).
    pub fn embed_texts(&self, texts: &[&str], chunk: usize, device: &Device) -> Result<Tensor> {
        let (model, tok) = self.text_side();
        embed_texts(model, tok, texts, chunk, device)
    }

    /// The id an index records of the model that embedded it.
    pub fn fingerprint(&self) -> Result<String> {
        match &self.origin {
            Origin::Run(run) => model_fingerprint(&run.dir),
            // The files, and how its images are prepared (read from its preprocessor_config.json
            // or open_clip config, not among the files hashed): an index embedded with other
            // preprocessing is another model's.
            Origin::Checkpoint { load, .. } => {
                let files = files_fingerprint(&[&load.config_file, &load.weights_file])?;
                let prep = clip_core::data::Preprocess::from_config(&self.model.config);
                let c = &self.model.config;
                let how = format!(
                    "{}|{}|{:?}|{:?}|{}",
                    prep.cache_variant(),
                    c.image.image_size,
                    c.image.mean,
                    c.image.std,
                    c.image.resize.unwrap_or(0)
                );
                Ok(format!("{files}-{:08x}", crc_of(how.as_bytes())))
            }
        }
    }

    /// How to name this model on a command line (for hints).
    pub fn flag(&self) -> String {
        match &self.origin {
            Origin::Run(run) => format!("--run {}", run.dir.display()),
            Origin::Checkpoint { spec, .. } => format!("--model {spec}"),
        }
    }

    /// Fails when `index` was embedded by another model.
    pub fn check_index(&self, index: &ImageIndex, dir: &Path) -> Result<()> {
        let fp = self.fingerprint()?;
        if index.fingerprint != fp {
            bail!(
                "index {} was made by another model (fingerprint {}, this model {fp}): rebuild it with `clip-predict index {} --images … --out {}`",
                dir.display(),
                index.fingerprint,
                self.flag(),
                dir.display()
            );
        }
        Ok(())
    }
}

/// The index folder when none is given: the run's `index/`; a pretrained model has no folder of
/// its own to keep one in.
pub(crate) fn default_index(choice: &ModelChoice) -> Result<PathBuf> {
    match &choice.run {
        Some(run) => Ok(run.join("index")),
        None => bail!("with --model, name the index folder (--index / --out DIR): a pretrained model has no run folder to keep it in"),
    }
}

pub(crate) fn load(choice: &ModelChoice, device: &Device) -> Result<Loaded> {
    let hub = Hub::from_env();
    let opened = match (&choice.run, &choice.model) {
        (Some(run), _) => open_model(ModelSpec::Run(run), &hub, device)?,
        (None, Some(spec)) => open_model(ModelSpec::Pretrained(spec), &hub, device)
            .with_context(|| format!("opening the pretrained CLIP {spec}"))?,
        (None, None) => bail!("name a model: --run DIR (trained by stage 4) or --model NAME|DIR (a pretrained CLIP)"),
    };
    let OpenedModel {
        origin,
        model,
        tokenizer: tok,
    } = opened;
    let captions_by = clip_core::distill::caption_teacher(&model.config, device)?;
    if let Some(t) = &captions_by {
        eprintln!(
            "note: captions are answered by the teacher's text tower ({}): this student was distilled on images alone",
            t.describe
        );
    }
    // The logits are those of whichever model's space the embeddings meet in.
    let scaled = captions_by.as_ref().map_or(&model, |t| &t.model);
    let scale = match scaled.config.loss {
        LossKind::Clip => scaled.logit_scale()?.unwrap_or(1.0),
        LossKind::Soft => (1.0 / scaled.config.temperature) as f32,
    };
    Ok(Loaded {
        origin,
        model,
        tok,
        captions_by,
        scale,
    })
}

/// A short stable id of some bytes (FNV-1a, 32 bits): enough to tell two preprocessings apart.
fn crc_of(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}
