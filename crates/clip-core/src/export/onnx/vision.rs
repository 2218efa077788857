//! The image encoder graph: pixels (N, 3, S, S), normalised as the model expects → the tower
//! (a CLIP ViT, as `crate::model::VisionTransformer` computes it, a timm ResNet or OpenAI's
//! ModifiedResNet) → its head → (for a student
//! that answers in its teacher's space) the map → unit rows (N, P).

use anyhow::Result;

use super::graph::{Attr, Dim, Graph};
use super::layers::{clip_block, head, l2_normalize, layer_norm, linear, BlockShape};
use crate::config::{ClipConfig, HeadKind, ImageArch, ImageConfig, ImagePool};

const TOWER: &str = "image_encoder.model";

/// The ViT under `image_encoder.model`: patch convolution → class token prepended → positions →
/// `pre_layrnorm` → blocks → `post_layernorm` at the class token, or over every token and then
/// averaged over the patch tokens (`avg`). Pooled features (N, width).
fn vit(g: &mut Graph, pixels: &str, cfg: &ImageConfig) -> Result<String> {
    let p = |n: &str| format!("{TOWER}.{n}");
    let (w, ps) = (cfg.width, cfg.patch_size as i64);
    let kernel = g.weight(&p("embeddings.patch_embedding.weight"), None)?;
    let x = g.op(
        "Conv",
        &[pixels, &kernel],
        vec![
            Attr::Ints("kernel_shape", vec![ps, ps]),
            Attr::Ints("strides", vec![ps, ps]),
        ],
    );
    let flat = g.ints("patch_grid", &[0, w as i64, -1]);
    let x = g.op("Reshape", &[&x, &flat], vec![]);
    let patches = g.op("Transpose", &[&x], vec![Attr::Ints("perm", vec![0, 2, 1])]); // (N, g², W)
    let cls = g.weight(&p("embeddings.class_embedding"), Some(&[1, 1, w]))?;
    let batch = g.op("Shape", &[pixels], vec![Attr::Int("start", 0), Attr::Int("end", 1)]);
    let rest = g.ints("cls_shape", &[1, w as i64]);
    let shape = g.op("Concat", &[&batch, &rest], vec![Attr::Int("axis", 0)]);
    let cls = g.op("Expand", &[&cls, &shape], vec![]);
    let x = g.op("Concat", &[&cls, &patches], vec![Attr::Int("axis", 1)]);
    let pos = g.weight(&p("embeddings.position_embedding.weight"), None)?;
    let x = g.op("Add", &[&x, &pos], vec![]);
    let mut x = layer_norm(g, &x, &p("pre_layrnorm"), cfg.layer_norm_eps)?;
    let shape = BlockShape {
        width: w,
        heads: cfg.heads,
        activation: cfg.activation,
        eps: cfg.layer_norm_eps,
    };
    for i in 0..cfg.layers {
        x = clip_block(g, &x, &p(&format!("encoder.layers.{i}")), shape, None)?;
    }
    match cfg.pool {
        ImagePool::Tok => {
            let first = g.int_scalar("class_token", 0);
            let x = g.op("Gather", &[&x, &first], vec![Attr::Int("axis", 1)]);
            layer_norm(g, &x, &p("post_layernorm"), cfg.layer_norm_eps)
        }
        ImagePool::Avg => {
            let x = layer_norm(g, &x, &p("post_layernorm"), cfg.layer_norm_eps)?;
            let (start, end, axis) = (g.ints("from", &[1]), g.ints("to", &[i64::MAX]), g.ints("axis", &[1]));
            let x = g.op("Slice", &[&x, &start, &end, &axis], vec![]);
            Ok(g.op(
                "ReduceMean",
                &[&x],
                vec![Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 0)],
            ))
        }
    }
}

/// After either tower: its head, the map into the teacher's space for a student that answers
/// there (as `ClipModel::answer_image` / `answer_text`), and unit rows.
pub fn embed(g: &mut Graph, features: &str, cfg: &ClipConfig, head_prefix: Option<&str>, map: &str) -> Result<String> {
    let mut e = match head_prefix {
        Some(prefix) => head(g, features, prefix, cfg.head)?,
        None => features.to_string(),
    };
    if cfg.distill.in_teacher_space() && cfg.distill.maps(cfg.projection_dim).is_some() {
        e = linear(g, &e, &format!("distill.{map}"), false)?;
    }
    Ok(l2_normalize(g, &e))
}

/// `image_encoder.onnx`: `pixel_values` (N, 3, S, S) float32 → `image_embeds` (N, P), unit rows.
pub fn image_encoder(g: &mut Graph, cfg: &ClipConfig, width: usize) -> Result<()> {
    let i = &cfg.image;
    let s = i.image_size;
    let pixels = g.input(
        "pixel_values",
        false,
        &[Dim::Free("batch"), Dim::Fixed(3), Dim::Fixed(s), Dim::Fixed(s)],
    );
    let features = match i.arch {
        ImageArch::Vit => vit(g, &pixels, i)?,
        ImageArch::Resnet => super::resnet::resnet(g, &pixels, i)?,
        ImageArch::ClipResnet => super::clip_resnet::modified_resnet(g, &pixels, i)?,
    };
    // A ModifiedResNet's attention pool already ends in CLIP's projection (`ClipModel`'s
    // `Head::Identity`).
    let head = (i.arch != ImageArch::ClipResnet || cfg.head != HeadKind::Linear).then_some("image_projection");
    let e = embed(g, &features, cfg, head, "image_map")?;
    g.output(&e, "image_embeds", &[Dim::Free("batch"), Dim::Fixed(width)]);
    Ok(())
}
