//! OpenAI's ModifiedResNet (CLIP RN50, RN101, RN50x4 …), trainable, with open_clip / OpenAI
//! names (`conv1`…`bn3`, `layerK.B.*`, `attnpool.*`).
//!
//! It differs from a timm ResNet in three ways, each of which changes every output:
//! - a stem of three 3×3 convolutions (the first with stride 2) and a 2×2 average pool instead of
//!   one 7×7 convolution and a max pool;
//! - anti-aliased strides: every convolution has stride 1, and a 2×2 average pool after the 3×3
//!   convolution (and before the shortcut's 1×1 convolution) halves the size;
//! - attention pooling: the spatial mean is prepended to the H·W positions, a position table is
//!   added, and one multi-head attention query (the mean's) reads the map; its output
//!   projection `c_proj` is already the CLIP embedding, so the tower has no separate head.

use anyhow::Result;
use candle_core::{Module, ModuleT, Tensor};

use crate::config::ImageConfig;
use crate::nn::{attention, BatchNorm2d, Conv2d, Linear};
use crate::params::{Init, ParamBuilder};

/// 2×2 average pool with stride 2 (candle's `avg_pool2d` has a backward when kernel = stride).
fn avg_pool(x: &Tensor, stride: usize) -> candle_core::Result<Tensor> {
    if stride > 1 {
        x.avg_pool2d(stride)
    } else {
        Ok(x.clone())
    }
}

struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    stride: usize,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Bottleneck {
    fn new(pb: &ParamBuilder, c_in: usize, planes: usize, stride: usize) -> Result<Self> {
        let out = planes * 4;
        let downsample = if stride > 1 || c_in != out {
            let d = pb.pp("downsample");
            Some((
                Conv2d::new(&d.pp(0), c_in, out, 1, 1, 0)?,
                BatchNorm2d::new(&d.pp(1), out)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv2d::new(&pb.pp("conv1"), c_in, planes, 1, 1, 0)?,
            bn1: BatchNorm2d::new(&pb.pp("bn1"), planes)?,
            conv2: Conv2d::new(&pb.pp("conv2"), planes, planes, 3, 1, 1)?,
            bn2: BatchNorm2d::new(&pb.pp("bn2"), planes)?,
            conv3: Conv2d::new(&pb.pp("conv3"), planes, out, 1, 1, 0)?,
            bn3: BatchNorm2d::new(&pb.pp("bn3"), out)?,
            stride,
            downsample,
        })
    }
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.bn1.forward_relu(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_relu(&self.conv2.forward(&h)?, train)?;
        let h = self
            .bn3
            .forward_t(&self.conv3.forward(&avg_pool(&h, self.stride)?)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(&avg_pool(x, self.stride)?)?, train)?,
            None => x.clone(),
        };
        crate::nn::add_relu(&h, &shortcut)
    }
}

/// The attention pool: (B, C, H, W) → (B, output_dim).
struct AttentionPool {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: usize,
}

impl AttentionPool {
    fn new(pb: &ParamBuilder, grid: usize, width: usize, heads: usize, out: usize) -> Result<Self> {
        Ok(Self {
            positional_embedding: pb.param(
                "positional_embedding",
                &[grid * grid + 1, width],
                Init::Normal {
                    std: (width as f64).powf(-0.5),
                },
            )?,
            q_proj: Linear::new(&pb.pp("q_proj"), width, width)?,
            k_proj: Linear::new(&pb.pp("k_proj"), width, width)?,
            v_proj: Linear::new(&pb.pp("v_proj"), width, width)?,
            c_proj: Linear::new(&pb.pp("c_proj"), width, out)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?; // (B, HW, C)
        let mean = tokens.mean_keepdim(1)?;
        let pos = crate::nn::param(&self.positional_embedding);
        if pos.dim(0)? != h * w + 1 {
            candle_core::bail!(
                "the feature map has {}×{} positions but the attention pool's table has {} rows: feed images of the tower's image_size",
                h,
                w,
                pos.dim(0)?
            )
        }
        let x = Tensor::cat(&[&mean, &tokens], 1)?
            .broadcast_add(&pos.unsqueeze(0)?)?
            .contiguous()?;
        // Only the mean's query is read out.
        let q = self.q_proj.forward(&x.narrow(1, 0, 1)?.contiguous()?)?;
        let (k, v) = (self.k_proj.forward(&x)?, self.v_proj.forward(&x)?);
        let keys = Tensor::zeros((b, h * w + 1), candle_core::DType::F32, x.device())?;
        let ctx = attention(&q, &k, &v, &keys, self.heads)?;
        self.c_proj.forward(&ctx)?.squeeze(1)
    }
}

pub struct ModifiedResNet {
    stem: Vec<(Conv2d, BatchNorm2d)>,
    layers: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool,
}

impl ModifiedResNet {
    pub fn new(pb: &ParamBuilder, cfg: &ImageConfig) -> Result<Self> {
        let w = cfg.width;
        let stem = vec![
            (
                Conv2d::new(&pb.pp("conv1"), 3, w / 2, 3, 2, 1)?,
                BatchNorm2d::new(&pb.pp("bn1"), w / 2)?,
            ),
            (
                Conv2d::new(&pb.pp("conv2"), w / 2, w / 2, 3, 1, 1)?,
                BatchNorm2d::new(&pb.pp("bn2"), w / 2)?,
            ),
            (
                Conv2d::new(&pb.pp("conv3"), w / 2, w, 3, 1, 1)?,
                BatchNorm2d::new(&pb.pp("bn3"), w)?,
            ),
        ];
        let mut c_in = w;
        let mut layers = vec![];
        for (i, &depth) in cfg.depths.iter().enumerate() {
            let planes = w << i;
            let lp = pb.pp(format!("layer{}", i + 1));
            let mut blocks = vec![];
            for j in 0..depth {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(&lp.pp(j), c_in, planes, stride)?);
                c_in = planes * 4;
            }
            layers.push(blocks);
        }
        let attnpool = AttentionPool::new(
            &pb.pp("attnpool"),
            cfg.image_size / 32,
            w * 32,
            cfg.heads,
            cfg.output_dim,
        )?;
        Ok(Self { stem, layers, attnpool })
    }
}

impl ModuleT for ModifiedResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (conv, bn) in &self.stem {
            h = bn.forward_relu(&conv.forward(&h)?, train)?;
        }
        h = avg_pool(&h, 2)?;
        for blocks in &self.layers {
            for b in blocks {
                h = b.forward_t(&h, train)?;
            }
        }
        self.attnpool.forward(&h)
    }
}
