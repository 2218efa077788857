//! clipmine's shared library: train your own small CLIP, one gated stage at a time.
//!
//! The modules are the concepts of the recipe: [`config`], [`model`] (towers, heads), [`loss`],
//! [`data`], [`train`], [`checkpoint`] and [`retrieval`]; [`report`] is what each stage prints and
//! writes as JSON.

pub mod config;
pub mod device;
pub mod hub;
pub mod loss;
pub mod model;
pub mod nn;
pub mod params;
pub mod pretrained;

pub use config::ClipConfig;
pub use model::ClipModel;
pub mod checkpoint;
pub mod cli;
pub mod report;
pub const CANDLE_VERSION: &str = "0.11.1";
pub mod data;
pub mod embed;
pub mod fit;
pub mod index;
pub mod optim;
pub mod plot;
pub mod prepare;
pub mod retrieval;
pub mod run_dir;
pub mod schedule;
pub mod train;
