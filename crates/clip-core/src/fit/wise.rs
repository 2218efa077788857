//! WiSE-FT at the end of a fine-tune: each α of a sweep validated, the best kept as the run's model.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{Trainer, Validation};
use crate::checkpoint::weights_bytes;
use crate::config::ClipConfig;
use crate::files::write_checked;
use crate::index::files_fingerprint;
use crate::model::ClipModel;
use crate::run_dir::WEIGHTS;
use crate::wise_ft::interpolate;

/// The pretrained checkpoint a run started from, as loaded: where from, the Hub commit of each
/// piece (whole CLIP, or image and text towers) and a fingerprint of the files read. WiSE-FT
/// blends with the checkpoint at the end of training, when a Hub branch may have moved or the
/// folder been replaced: it loads the pinned commits and refuses files whose fingerprint differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PretrainedPin {
    pub source: String,
    /// Hub commits: the whole CLIP's, else `image` / `text` towers' (absent for a local folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_commit: Option<String>,
    /// xxh3-128 over the files read (config and weights), in load order.
    pub fingerprint: String,
}

impl PretrainedPin {
    /// The pin of what [`crate::pretrained::load_pretrained`] loaded (`None`: nothing pretrained).
    pub fn of(report: &crate::pretrained::LoadReport) -> Result<Option<Self>> {
        use crate::pretrained::TowerKind;
        if let Some(c) = &report.clip {
            let fingerprint = files_fingerprint(&[c.config_file.as_path(), c.weights_file.as_path()])?;
            return Ok(Some(Self {
                source: c.source.clone(),
                commit: c.commit.clone(),
                image_commit: None,
                text_commit: None,
                fingerprint,
            }));
        }
        if report.towers.is_empty() {
            return Ok(None);
        }
        let files: Vec<&std::path::Path> = report.towers.iter().map(|t| t.file.as_path()).collect();
        let commit = |k: TowerKind| {
            report
                .towers
                .iter()
                .find(|t| t.tower == k)
                .and_then(|t| t.commit.clone())
        };
        Ok(Some(Self {
            source: report
                .towers
                .iter()
                .map(|t| t.source.as_str())
                .collect::<Vec<_>>()
                .join(" + "),
            commit: None,
            image_commit: commit(TowerKind::Image),
            text_commit: commit(TowerKind::Text),
            fingerprint: files_fingerprint(&files)?,
        }))
    }

    /// `cfg` with each Hub revision replaced by the pinned commit.
    pub fn pinned_config(&self, cfg: &ClipConfig) -> ClipConfig {
        let mut cfg = cfg.clone();
        if let Some(c) = &self.commit {
            cfg.revision = Some(c.clone());
        }
        if let Some(c) = &self.image_commit {
            cfg.image.revision = Some(c.clone());
        }
        if let Some(c) = &self.text_commit {
            cfg.text.revision = Some(c.clone());
        }
        cfg
    }
}

/// One α of the sweep and what validation measured for its weights.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WisePoint {
    pub alpha: f64,
    pub validation: Validation,
}

/// The sweep, and the α whose weights became the run's model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WiseFt {
    pub points: Vec<WisePoint>,
    pub chosen: f64,
}

impl Trainer {
    /// Interpolates the checkpoint the run started from and the model now loaded (the best
    /// epoch) at each α, validates each, and keeps the best — highest zero-shot accuracy or
    /// recall@1, then lowest validation loss, then the larger α — as `model.safetensors`.
    /// Only for a run that started from a pretrained CLIP (`pretrained`).
    pub fn wise_ft(&mut self, alphas: &[f64], mut on_point: impl FnMut(&WisePoint)) -> Result<WiseFt> {
        if self.cfg.pretrained.is_none() {
            bail!("--wise-ft interpolates with the pretrained checkpoint a run started from; this run has none (its config sets no `pretrained`)");
        }
        if alphas.is_empty() {
            bail!("--wise-ft needs at least one α");
        }
        // Copies: the store's tensors share storage with the parameters the loop overwrites.
        let tuned = self
            .model
            .params
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
        let start = {
            // The checkpoint the run started from: its pinned commits, and the same files.
            let pin = self.state.pretrained.clone();
            let cfg = pin
                .as_ref()
                .map_or_else(|| self.cfg.clone(), |p| p.pinned_config(&self.cfg));
            let m = ClipModel::new(&cfg, &self.data.device)?;
            let loaded = crate::pretrained::load_pretrained(&m, &self.hub())?;
            if let (Some(want), Some(got)) = (&pin, PretrainedPin::of(&loaded)?) {
                if got.fingerprint != want.fingerprint {
                    bail!(
                        "--wise-ft: the pretrained checkpoint {} is not the one this run started from (its files' fingerprint is {}, recorded {}{}): WiSE-FT would blend the fine-tuned weights with another model — put the original files back, or leave out --wise-ft",
                        got.source,
                        got.fingerprint,
                        want.fingerprint,
                        want.commit.as_ref().map(|c| format!(", commit {c}")).unwrap_or_default()
                    );
                }
            }
            m.params.tensors()
        };
        let mut points = vec![];
        let mut best: Option<WisePoint> = None;
        for &alpha in alphas {
            self.model.params.load_map(&interpolate(&start, &tuned, alpha)?)?;
            *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let p = WisePoint {
                alpha,
                validation: self.validate()?,
            };
            on_point(&p);
            let better = match &best {
                None => true,
                Some(b) => {
                    let (q, bq) = (p.validation.quality(), b.validation.quality());
                    q > bq || (q == bq && p.validation.loss <= b.validation.loss)
                }
            };
            if better {
                best = Some(p);
            }
            points.push(p);
        }
        let chosen = best.expect("at least one α").alpha;
        self.model.params.load_map(&interpolate(&start, &tuned, chosen)?)?;
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
        write_checked(&self.out, &[(WEIGHTS.into(), weights_bytes(&self.model.params)?)])?;
        let w = WiseFt { points, chosen };
        self.state.wise_ft = Some(w.clone());
        self.write_metrics()?;
        Ok(w)
    }
}
