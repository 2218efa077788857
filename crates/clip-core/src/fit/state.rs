//! What a run remembers between epochs and across a resume: the history, the best model so far,
//! the schedule, the position inside a stopped epoch, and what a resume changed.

use std::collections::BTreeSet;

use anyhow::Result;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::ClipConfig;
use crate::retrieval::Recall;
use crate::schedule::Plateau;

/// One line of the training history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    /// NaN (`null` in JSON) when validation had no batch or diverged.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    pub lr_image: f64,
    pub lr_text: f64,
    pub lr_head: f64,
    pub recall: Recall,
    /// Zero-shot accuracy on validation, for class-folder datasets.
    #[serde(default)]
    pub zero_shot: Option<f64>,
    pub seconds: f64,
    pub pairs_per_second: f64,
}

/// What `--resume` needs besides weights and optimiser state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// The loss that picked the best model: validation loss, or training loss when the validation
    /// split is too small for a batch (see [`super::Trainer::selection_note`]). Infinite (`null` in JSON)
    /// until an epoch has a finite one.
    #[serde(deserialize_with = "inf_if_null")]
    pub best_val_loss: f64,
    /// The epoch of `model.safetensors`; 0 is the untrained model (no epoch had a finite loss yet).
    pub best_epoch: usize,
    #[serde(deserialize_with = "plateau_lenient")]
    pub plateau: Plateau,
    pub history: Vec<EpochRecord>,
    /// Validation of the model before its first step (a pretrained start's checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<super::Validation>,
    /// Top-1 agreement with the distillation teacher on validation, before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_start: Option<f64>,
    /// The teacher beside the student at the end of a distillation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<crate::distill::Summary>,
    /// The WiSE-FT sweep at the end of a fine-tune (`--wise-ft`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wise_ft: Option<super::WiseFt>,
    /// The epoch in progress when training was stopped in its middle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
    /// The pretrained checkpoint the run started from, pinned (its Hub commits and a fingerprint
    /// of its files): WiSE-FT re-reads exactly it at the end, or refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<super::wise::PretrainedPin>,
    /// The ranks training the run (data-parallel; 1 for one process): a run continues only with
    /// as many, since the steps' batches and dropout masks depend on them. `None` before it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// How far into an epoch a stopped run got: its steps and their losses (so the epoch's mean loss
/// comes out as in an uninterrupted run).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartialEpoch {
    /// Optimiser steps done in the epoch.
    pub steps: usize,
    pub losses: Vec<f64>,
    pub pairs: usize,
    pub seconds: f64,
}

/// Training stopped at the end of a step because [`super::Trainer::set_stop`]'s flag was raised;
/// the error [`super::Trainer::train_epoch`] returns then (save with
/// [`super::Trainer::save_checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// 1-based epoch and step.
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped after step {} of {} in epoch {}",
            self.step, self.steps, self.epoch
        )
    }
}

impl std::error::Error for Stopped {}

/// One changed config key on resume: `key: old → new`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} → {}", self.key, self.old, self.new)
    }
}

/// The keys whose values differ between two configs, as `section.key`.
pub fn config_changes(old: &ClipConfig, new: &ClipConfig) -> Result<Vec<Change>> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let leaves = |c: &ClipConfig| -> Result<Vec<(String, toml::Value)>> {
        let mut out = vec![];
        flatten("", &toml::Value::try_from(c)?, &mut out);
        Ok(out)
    };
    let (a, b) = (leaves(old)?, leaves(new)?);
    let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(none)".into());
    let keys: BTreeSet<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    let get = |l: &[(String, toml::Value)], k: &str| l.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (x, y) = (get(&a, k), get(&b, k));
            (x != y).then(|| Change {
                key: k.clone(),
                old: show(x.as_ref()),
                new: show(y.as_ref()),
            })
        })
        .collect())
}

/// JSON has no NaN or infinity (serde_json writes `null`): read `null` back as NaN.
pub(super) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A best-so-far loss of `null` was infinite (nothing measured yet).
fn inf_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

/// The plateau's `best` starts infinite, written as `null`.
fn plateau_lenient<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Plateau, D::Error> {
    let mut v = serde_json::Value::deserialize(d)?;
    let unset = v.get("best").is_some_and(serde_json::Value::is_null);
    if unset {
        v["best"] = serde_json::json!(0.0);
    }
    let mut p: Plateau = serde_json::from_value(v).map_err(serde::de::Error::custom)?;
    if unset {
        p.best = f64::INFINITY;
    }
    Ok(p)
}
