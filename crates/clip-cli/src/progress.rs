//! Terminal progress bars (indicatif) behind clip-core's [`Progress`] reports.

use std::sync::Mutex;

use clip_core::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar per piece of work, drawn on the terminal (hidden when output is not a terminal).
#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"))
        {
            bar.set_style(style);
        }
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn inc(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// The bar of one training epoch: `epoch 3/40 [=====>    ] 12/20 loss … lr … pairs/s`.
pub fn epoch_bar(epoch: usize, epochs: usize, steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if let Ok(style) = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}
