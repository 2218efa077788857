//! OpenAI's ModifiedResNet (`crate::model::ModifiedResNet`: CLIP RN50 …) as ONNX nodes: the
//! three-convolution stem and its 2×2 average pool, bottlenecks whose strides are 2×2 average
//! pools (after the 3×3 convolution, and before the shortcut's convolution), and the attention
//! pool: the spatial mean prepended to the positions, a position table added, the mean's query
//! attending over all of them, `c_proj` giving the embedding.

use anyhow::Result;

use super::graph::{Attr, Graph};
use super::layers::{attention, linear};
use super::resnet::conv_bn;
use crate::config::ImageConfig;

const TOWER: &str = "image_encoder.model";

/// A `stride`×`stride` average pool (none for stride 1).
fn avg_pool(g: &mut Graph, x: &str, stride: usize) -> String {
    if stride <= 1 {
        return x.to_string();
    }
    let s = stride as i64;
    g.op(
        "AveragePool",
        &[x],
        vec![
            Attr::Ints("kernel_shape", vec![s, s]),
            Attr::Ints("strides", vec![s, s]),
        ],
    )
}

/// One bottleneck under `prefix` (`layerI.J`).
fn bottleneck(g: &mut Graph, x: &str, prefix: &str, stride: usize, shortcut: bool) -> Result<String> {
    let n = |s: &str| format!("{prefix}.{s}");
    let h = conv_bn(g, x, &n("conv1"), &n("bn1"), (1, 1), true)?;
    let h = conv_bn(g, &h, &n("conv2"), &n("bn2"), (3, 1), true)?;
    let h = avg_pool(g, &h, stride);
    let h = conv_bn(g, &h, &n("conv3"), &n("bn3"), (1, 1), false)?;
    let skip = if shortcut {
        let pooled = avg_pool(g, x, stride);
        conv_bn(g, &pooled, &n("downsample.0"), &n("downsample.1"), (1, 1), false)?
    } else {
        x.to_string()
    };
    let y = g.op("Add", &[&h, &skip], vec![]);
    Ok(g.op("Relu", &[&y], vec![]))
}

/// The attention pool: (N, C, h, w) → (N, output_dim).
fn attention_pool(g: &mut Graph, x: &str, width: usize, heads: usize) -> Result<String> {
    let p = |n: &str| format!("{TOWER}.attnpool.{n}");
    let flat = g.ints("map_shape", &[0, width as i64, -1]);
    let tokens = g.op("Reshape", &[x, &flat], vec![]);
    let tokens = g.op("Transpose", &[&tokens], vec![Attr::Ints("perm", vec![0, 2, 1])]); // (N, hw, C)
    let mean = g.op(
        "ReduceMean",
        &[&tokens],
        vec![Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 1)],
    );
    let x = g.op("Concat", &[&mean, &tokens], vec![Attr::Int("axis", 1)]);
    let pos = g.weight(&p("positional_embedding"), None)?;
    let x = g.op("Add", &[&x, &pos], vec![]);
    let (start, end, axis) = (g.ints("from", &[0]), g.ints("to", &[1]), g.ints("axis", &[1]));
    let first = g.op("Slice", &[&x, &start, &end, &axis], vec![]);
    let q = linear(g, &first, &p("q_proj"), true)?;
    let k = linear(g, &x, &p("k_proj"), true)?;
    let v = linear(g, &x, &p("v_proj"), true)?;
    let ctx = attention(g, &q, &k, &v, None, heads, width);
    let out = linear(g, &ctx, &p("c_proj"), true)?; // (N, 1, output_dim)
    let axes = g.ints("axes", &[1]);
    Ok(g.op("Squeeze", &[&out, &axes], vec![]))
}

/// Images (N, 3, S, S) → embeddings (N, output_dim).
pub fn modified_resnet(g: &mut Graph, pixels: &str, cfg: &ImageConfig) -> Result<String> {
    let mut h = pixels.to_string();
    for (i, stride) in [2, 1, 1].into_iter().enumerate() {
        let (conv, bn) = (format!("conv{}", i + 1), format!("bn{}", i + 1));
        h = conv_bn(g, &h, &conv, &bn, (3, stride), true)?;
    }
    h = avg_pool(g, &h, 2);
    let w = cfg.width;
    let mut c_in = w;
    for (i, &depth) in cfg.depths.iter().enumerate() {
        let planes = w << i;
        for j in 0..depth {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            let prefix = format!("layer{}.{j}", i + 1);
            h = bottleneck(g, &h, &prefix, stride, stride > 1 || c_in != planes * 4)?;
            c_in = planes * 4;
        }
    }
    attention_pool(g, &h, w * 32, cfg.heads)
}
