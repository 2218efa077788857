use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::params::{Init, ParamBuilder};

/// `nn.Conv2d` without bias (ResNet convolutions are always followed by BatchNorm).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Kaiming-normal (fan_out, ReLU) initialisation, as torchvision and timm do.
    pub fn new(
        pb: &ParamBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let std = (2.0 / (c_out * k * k) as f64).sqrt();
        Ok(Self {
            weight: pb.param("weight", &[c_out, c_in, k, k], Init::Normal { std })?,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }
}
