//! WiSE-FT at the end of a fine-tune: each α of a sweep validated, the best kept as the run's model.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{Trainer, Validation};
use crate::checkpoint::weights_bytes;
use crate::files::write_checked;
use crate::model::ClipModel;
use crate::run_dir::WEIGHTS;
use crate::wise_ft::interpolate;

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
            let m = ClipModel::new(&self.cfg, &self.data.device)?;
            crate::pretrained::load_pretrained(&m, &crate::hub::Hub::from_env())?;
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
