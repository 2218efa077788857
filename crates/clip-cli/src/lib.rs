//! What clipmine's programs (the four stages, `clip-predict`, `xtask`) share and the library does
//! not need: command-line arguments, progress bars, the stage reports, plots, the HTML report.
//!
//! `clip-core` stays free of user-interface crates; everything here presents what it computes.

/// Arguments every stage shares, so `cargo xtask verify` can pass the same flags to each.
pub mod args;
/// What stages 1 and 4 print about a distillation teacher and inherited weights.
pub mod distill;
/// `report.html`: a self-contained page per run folder (curves, similarity, rankings).
pub mod html_report;
/// The C allocator's settings for the programs: freed memory is reused, not returned.
pub mod memory;
/// Labelled plots: curves per epoch and heat maps, as PNG or SVG.
pub mod plot;
/// Terminal progress bars for clip-core's progress reports.
pub mod progress;
/// What a stage checked, printed for people and written as JSON for the pipeline.
pub mod report;

pub use args::{activate_precision, run_stage, DataArgs, ModelArgs, PrecisionArg, TrainArgs};
pub use report::{fmt_count, Report};
