//! The CLIP model: an image tower (a timm ResNet, a CLIP ViT or OpenAI's ModifiedResNet), a text
//! tower (DistilBERT / BERT or the CLIP text transformer), and a head for each.

pub mod blocks;
mod clip;
mod clip_resnet;
mod clip_text;
mod head;
mod position;
mod resnet;
mod text_encoder;
mod towers;
mod transformer;
mod vit;

pub use clip::{ClipModel, Embeddings, ModelSize};
pub use clip_resnet::ModifiedResNet;
pub use clip_text::{eot_positions, ClipTextTransformer};
pub use head::ProjectionHead;
pub use resnet::ResNet;
pub use text_encoder::TextEncoder;
pub(crate) use text_encoder::{scheme as bert_scheme, Scheme as BertScheme};
pub use towers::{Head, ImageTower, TextTower};
pub use transformer::{AttentionMask, ResidualAttentionBlock};
pub use vit::VisionTransformer;
