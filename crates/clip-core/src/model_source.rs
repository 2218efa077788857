//! Opening a model to use: a run folder written by stage 4, or a pretrained CLIP (a preset, a
//! Hugging Face repo or a folder). One way in for clip-predict (every command and `serve`) and
//! for a distillation's teacher ([`crate::distill::Teacher::open`]).

use std::path::Path;

use anyhow::Result;
use candle_core::Device;

use crate::data::TextTokenizer;
use crate::hub::Hub;
use crate::model::ClipModel;
use crate::pretrained_clip::{self, ClipLoad};
use crate::run_dir::RunDir;

/// Which model to open.
#[derive(Debug, Clone, Copy)]
pub enum ModelSpec<'a> {
    /// A run folder written by stage 4.
    Run(&'a Path),
    /// A pretrained CLIP: a preset that names one, a Hugging Face repo or a local folder.
    Pretrained(&'a str),
}

impl<'a> ModelSpec<'a> {
    /// A run folder when `spec` is a folder holding a run's `config.toml`, else a pretrained CLIP.
    pub fn guess(spec: &'a str) -> Self {
        let path = Path::new(spec);
        if path.join(crate::run_dir::CONFIG).is_file() {
            Self::Run(path)
        } else {
            Self::Pretrained(spec)
        }
    }
}

/// Where an opened model came from.
pub enum Origin {
    /// A run folder written by stage 4.
    Run(RunDir),
    /// A pretrained CLIP, as its files give it.
    Checkpoint { spec: String, load: ClipLoad },
}

/// A model and its tokenizer, opened.
pub struct OpenedModel {
    pub origin: Origin,
    pub model: ClipModel,
    pub tokenizer: TextTokenizer,
}

/// Opens the model `spec` names on `device`, a pretrained CLIP through `hub`.
pub fn open_model(spec: ModelSpec, hub: &Hub, device: &Device) -> Result<OpenedModel> {
    match spec {
        ModelSpec::Run(dir) => {
            let run = RunDir::open(dir)?;
            let (model, tokenizer) = run.load(device)?;
            Ok(OpenedModel {
                origin: Origin::Run(run),
                model,
                tokenizer,
            })
        }
        ModelSpec::Pretrained(name) => {
            let o = pretrained_clip::open(name, hub, device)?;
            Ok(OpenedModel {
                origin: Origin::Checkpoint {
                    spec: name.to_string(),
                    load: o.load,
                },
                model: o.model,
                tokenizer: o.tokenizer,
            })
        }
    }
}
