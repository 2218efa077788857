//! The timm ResNet image tower (`crate::model::ResNet`, the recipe's) as ONNX nodes: convolutions
//! without bias, BatchNorm in evaluation mode (its running statistics), the 3×3 stride-2 max-pool
//! stem, residual blocks (basic or bottleneck, stride on the 3×3 convolution) and the global
//! average pool.

use anyhow::Result;

use super::graph::{Attr, Graph};
use crate::config::{Block, ImageConfig};

const TOWER: &str = "image_encoder.model";

/// `bn(conv(x))` under `conv` and `bn` (then ReLU if `relu`): kernel `k`, `stride`, padding k/2,
/// the BatchNorm with its running statistics (evaluation mode).
pub fn conv_bn(
    g: &mut Graph,
    x: &str,
    conv: &str,
    bn: &str,
    (k, stride): (usize, usize),
    relu: bool,
) -> Result<String> {
    let w = g.weight(&format!("{TOWER}.{conv}.weight"), None)?;
    let (k, s, p) = (k as i64, stride as i64, (k / 2) as i64);
    let y = g.op(
        "Conv",
        &[x, &w],
        vec![
            Attr::Ints("kernel_shape", vec![k, k]),
            Attr::Ints("strides", vec![s, s]),
            Attr::Ints("pads", vec![p, p, p, p]),
        ],
    );
    let names = ["weight", "bias", "running_mean", "running_var"].map(|n| format!("{TOWER}.{bn}.{n}"));
    let mut inputs = vec![y];
    for n in &names {
        inputs.push(g.weight(n, None)?);
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let y = g.op("BatchNormalization", &refs, vec![Attr::Float("epsilon", 1e-5)]);
    Ok(if relu { g.op("Relu", &[&y], vec![]) } else { y })
}

/// One residual block under `prefix` (`layerI.J`).
fn block(g: &mut Graph, x: &str, prefix: &str, kind: Block, stride: usize, shortcut: bool) -> Result<String> {
    let shapes: &[(usize, usize)] = match kind {
        Block::Basic => &[(3, stride), (3, 1)],
        Block::Bottleneck => &[(1, 1), (3, stride), (1, 1)],
    };
    let mut h = x.to_string();
    for (i, &shape) in shapes.iter().enumerate() {
        let last = i + 1 == shapes.len();
        let (conv, bn) = (format!("{prefix}.conv{}", i + 1), format!("{prefix}.bn{}", i + 1));
        h = conv_bn(g, &h, &conv, &bn, shape, !last)?;
    }
    let skip = if shortcut {
        let (conv, bn) = (format!("{prefix}.downsample.0"), format!("{prefix}.downsample.1"));
        conv_bn(g, x, &conv, &bn, (1, stride), false)?
    } else {
        x.to_string()
    };
    let y = g.op("Add", &[&h, &skip], vec![]);
    Ok(g.op("Relu", &[&y], vec![]))
}

/// Images (N, 3, S, S) → pooled features (N, widths.last × expansion).
pub fn resnet(g: &mut Graph, pixels: &str, cfg: &ImageConfig) -> Result<String> {
    let mut h = conv_bn(g, pixels, "conv1", "bn1", (cfg.stem_kernel, cfg.stem_stride), true)?;
    if cfg.stem_pool {
        h = g.op(
            "MaxPool",
            &[&h],
            vec![
                Attr::Ints("kernel_shape", vec![3, 3]),
                Attr::Ints("strides", vec![2, 2]),
                Attr::Ints("pads", vec![1, 1, 1, 1]),
            ],
        );
    }
    let mut c_in = cfg.stem_width;
    for (i, (&depth, &width)) in cfg.depths.iter().zip(&cfg.widths).enumerate() {
        for j in 0..depth {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            let c_out = width * cfg.expansion();
            let prefix = format!("layer{}.{j}", i + 1);
            h = block(g, &h, &prefix, cfg.block, stride, stride != 1 || c_in != c_out)?;
            c_in = c_out;
        }
    }
    Ok(g.op(
        "ReduceMean",
        &[&h],
        vec![Attr::Ints("axes", vec![2, 3]), Attr::Int("keepdims", 0)],
    ))
}
