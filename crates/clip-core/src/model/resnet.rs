//! ResNet v1.5 (stride on the 3×3 convolution) with timm / torchvision parameter names, so
//! `resnet50` weights from either load unchanged: `conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, … The classifier (`fc`) is left out: the tower ends at the global
//! average pool, as `timm.create_model(..., num_classes=0)`.

use anyhow::Result;
use candle_core::{Module, ModuleT, Tensor};

use crate::config::{Block, ImageConfig};
use crate::nn::{max_pool_3x3_s2, BatchNorm2d, Conv2d};
use crate::params::ParamBuilder;

struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

struct ResBlock {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<Downsample>,
}

impl ResBlock {
    /// `last_gamma`: the initial scale of the block's last BatchNorm (0 with `zero_init_last`).
    fn new(pb: &ParamBuilder, block: Block, c_in: usize, width: usize, stride: usize, last_gamma: f64) -> Result<Self> {
        let (convs, c_out) = match block {
            Block::Basic => (
                vec![
                    (
                        Conv2d::new(&pb.pp("conv1"), c_in, width, 3, stride, 1)?,
                        BatchNorm2d::new(&pb.pp("bn1"), width)?,
                    ),
                    (
                        Conv2d::new(&pb.pp("conv2"), width, width, 3, 1, 1)?,
                        BatchNorm2d::with_scale(&pb.pp("bn2"), width, last_gamma)?,
                    ),
                ],
                width,
            ),
            Block::Bottleneck => (
                vec![
                    (
                        Conv2d::new(&pb.pp("conv1"), c_in, width, 1, 1, 0)?,
                        BatchNorm2d::new(&pb.pp("bn1"), width)?,
                    ),
                    (
                        Conv2d::new(&pb.pp("conv2"), width, width, 3, stride, 1)?,
                        BatchNorm2d::new(&pb.pp("bn2"), width)?,
                    ),
                    (
                        Conv2d::new(&pb.pp("conv3"), width, width * 4, 1, 1, 0)?,
                        BatchNorm2d::with_scale(&pb.pp("bn3"), width * 4, last_gamma)?,
                    ),
                ],
                width * 4,
            ),
        };
        let downsample = if stride != 1 || c_in != c_out {
            let ds = pb.pp("downsample");
            Some(Downsample {
                conv: Conv2d::new(&ds.pp(0), c_in, c_out, 1, stride, 0)?,
                bn: BatchNorm2d::new(&ds.pp(1), c_out)?,
            })
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }
}

impl ModuleT for ResBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let z = conv.forward(&h)?;
            h = if i != last {
                bn.forward_relu(&z, train)?
            } else {
                bn.forward_t(&z, train)?
            };
        }
        let shortcut = match &self.downsample {
            Some(d) => d.bn.forward_t(&d.conv.forward(x)?, train)?,
            None => x.clone(),
        };
        crate::nn::add_relu(&h, &shortcut)
    }
}

/// The image tower: images (B, 3, S, S) → pooled features (B, widths.last × expansion).
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stem_pool: bool,
    layers: Vec<Vec<ResBlock>>,
}

impl ResNet {
    pub fn new(pb: &ParamBuilder, cfg: &ImageConfig) -> Result<Self> {
        let k = cfg.stem_kernel;
        let conv1 = Conv2d::new(&pb.pp("conv1"), 3, cfg.stem_width, k, cfg.stem_stride, k / 2)?;
        let bn1 = BatchNorm2d::new(&pb.pp("bn1"), cfg.stem_width)?;
        let last_gamma = if cfg.zero_init_last { 0.0 } else { 1.0 };
        let mut c_in = cfg.stem_width;
        let mut layers = vec![];
        for (i, (&depth, &width)) in cfg.depths.iter().zip(&cfg.widths).enumerate() {
            let lp = pb.pp(format!("layer{}", i + 1));
            let mut blocks = vec![];
            for j in 0..depth {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(ResBlock::new(&lp.pp(j), cfg.block, c_in, width, stride, last_gamma)?);
                c_in = width * cfg.expansion();
            }
            layers.push(blocks);
        }
        Ok(Self {
            conv1,
            bn1,
            stem_pool: cfg.stem_pool,
            layers,
        })
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = self.bn1.forward_relu(&self.conv1.forward(x)?, train)?;
        if self.stem_pool {
            h = max_pool_3x3_s2(&h)?;
        }
        for blocks in &self.layers {
            for b in blocks {
                h = b.forward_t(&h, train)?;
            }
        }
        // Global average pool.
        h.mean((2, 3))
    }
}
