//! The data section (`[data]`): caption length, validation split and image preparation.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Longest caption in tokens (the tutorial's 200); also capped by the position table.
    pub max_length: usize,
    /// Share of images held out for validation.
    pub val_fraction: f64,
    /// Shorter-side resize + centre crop instead of the tutorial's plain resize.
    pub center_crop: bool,
    /// Train-time random resized crop + horizontal flip.
    pub augment: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            max_length: 200,
            val_fraction: 0.2,
            center_crop: false,
            augment: false,
        }
    }
}

impl DataConfig {
    /// The split's and the captions' checks.
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        if !(0.0..1.0).contains(&self.val_fraction) {
            errs.push(format!(
                "data.val_fraction must be in [0, 1) (got {})",
                self.val_fraction
            ));
        }
        if self.max_length < 2 {
            errs.push("data.max_length must be at least 2 ([CLS] and [SEP])".into());
        }
    }
}
