//! The CLIP model: a ResNet image tower, a DistilBERT / BERT text tower, and a projection head for each.

mod clip;
mod head;
mod resnet;
mod text_encoder;

pub use clip::{ClipModel, Embeddings};
pub use head::ProjectionHead;
pub use resnet::ResNet;
pub use text_encoder::TextEncoder;
