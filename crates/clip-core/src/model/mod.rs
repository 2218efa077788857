//! The CLIP model: a ResNet image tower, a DistilBERT text tower, and a projection head for each.

mod clip;
mod distilbert;
mod head;
mod resnet;

pub use clip::{ClipModel, Embeddings};
pub use distilbert::DistilBert;
pub use head::ProjectionHead;
pub use resnet::ResNet;
