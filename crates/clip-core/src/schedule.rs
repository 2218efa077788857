//! Learning-rate schedules: the tutorial's ReduceLROnPlateau, and cosine with warm-up.

use serde::{Deserialize, Serialize};

/// PyTorch's `ReduceLROnPlateau(mode="min", patience, factor)` with its default relative
/// threshold of 1e-4: after `patience` epochs without improvement, multiply the rate by `factor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plateau {
    pub patience: usize,
    pub factor: f64,
    pub best: f64,
    pub bad_epochs: usize,
    /// Current multiplier of the base learning rates.
    pub scale: f64,
}

impl Plateau {
    pub fn new(patience: usize, factor: f64) -> Self {
        Self {
            patience,
            factor,
            best: f64::INFINITY,
            bad_epochs: 0,
            scale: 1.0,
        }
    }

    /// Feeds one epoch's validation loss; returns the new multiplier.
    pub fn observe(&mut self, val_loss: f64) -> f64 {
        if val_loss < self.best * (1.0 - 1e-4) {
            self.best = val_loss;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        if self.bad_epochs > self.patience {
            self.scale *= self.factor;
            self.bad_epochs = 0;
        }
        self.scale
    }
}

/// Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`.
pub fn cosine(step: u64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_waits_patience_epochs_then_scales() {
        let mut p = Plateau::new(1, 0.8);
        assert_eq!(p.observe(1.0), 1.0); // best
        assert_eq!(p.observe(1.0), 1.0); // 1 bad epoch: within patience
        assert!((p.observe(1.0) - 0.8).abs() < 1e-12); // 2nd bad epoch: reduce
        assert!((p.observe(0.5) - 0.8).abs() < 1e-12); // improvement resets
        assert_eq!(p.bad_epochs, 0);
    }

    #[test]
    fn cosine_warms_up_then_decays_to_zero() {
        assert!((cosine(0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((cosine(9, 10, 110) - 1.0).abs() < 1e-12);
        assert!((cosine(10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((cosine(60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(cosine(110, 10, 110).abs() < 1e-12);
    }
}
