use anyhow::Result;
use candle_core::{ModuleT, Tensor, Var};

use crate::params::{Init, ParamBuilder};

/// `nn.BatchNorm2d` that trains: batch statistics (and running-stat updates) in training mode,
/// running statistics in evaluation mode.
///
/// candle-nn's and candle-transformers' ResNets only have the evaluation half.
///
/// ```
/// use candle_core::{Device, ModuleT, Tensor};
/// use clip_core::nn::BatchNorm2d;
/// use clip_core::params::{Group, ParamStore};
///
/// let store = ParamStore::new(&Device::Cpu, 0);
/// let bn = BatchNorm2d::new(&store.root(Group::ImageTower, true).pp("bn1"), 4)?;
/// let x = Tensor::randn(1f32, 2f32, (8, 4, 5, 5), &Device::Cpu)?;
/// // Training mode normalises with the batch's statistics and updates the running ones.
/// let y = bn.forward_t(&x, true)?;
/// assert_eq!(y.dims(), [8, 4, 5, 5]);
/// let mean = store.get("bn1.running_mean").unwrap().var.as_tensor().to_vec1::<f32>()?;
/// assert!(mean.iter().all(|&m| m != 0.0), "running statistics moved: {mean:?}");
/// // γ and β get gradients (the running statistics are buffers, not trained).
/// let grads = (y * &x)?.sum_all()?.backward()?;
/// for (name, e) in store.entries().into_iter().filter(|(_, e)| e.is_param()) {
///     let g = grads.get(e.var.as_tensor()).expect(&name);
///     assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    /// Its scale and shift are not trained (a frozen or locked tower): it always normalises with
    /// its running statistics and never updates them, as open_clip's `freeze_batch_norm_2d`.
    locked: bool,
}

impl BatchNorm2d {
    pub fn new(pb: &ParamBuilder, channels: usize) -> Result<Self> {
        Self::with_scale(pb, channels, 1.0)
    }

    /// A BatchNorm whose scale γ starts at `gamma` (0 for a residual block's last one, see
    /// `ImageConfig::zero_init_last`).
    pub fn with_scale(pb: &ParamBuilder, channels: usize, gamma: f64) -> Result<Self> {
        let weight = pb.param("weight", &[channels], Init::Const(gamma))?;
        Ok(Self {
            // A trainable parameter is the variable itself; a frozen or locked one is detached.
            locked: !weight.is_variable(),
            weight,
            bias: pb.param("bias", &[channels], Init::Const(0.0))?,
            running_mean: pb.buffer("running_mean", &[channels], Init::Const(0.0))?,
            running_var: pb.buffer("running_var", &[channels], Init::Const(1.0))?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }
}

impl BatchNorm2d {
    /// Running statistics follow PyTorch: momentum 0.1, unbiased variance.
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> candle_core::Result<()> {
        let m = self.momentum;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n as f64 - 1.0)))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }
}

impl BatchNorm2d {
    /// The same update as [`Self::update_running`], in place on the host (fused kernel path).
    fn update_running_host(&self, mean: &[f32], var: &[f32], n: usize) -> candle_core::Result<()> {
        use super::batch_norm_cpu::RunningUpdate;
        let momentum = self.momentum as f32;
        self.running_mean.as_tensor().inplace_op1(&RunningUpdate {
            momentum,
            scale: 1.0,
            batch: mean,
        })?;
        self.running_var.as_tensor().inplace_op1(&RunningUpdate {
            momentum,
            scale: n as f32 / (n as f32 - 1.0),
            batch: var,
        })
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, false)
    }
}

impl BatchNorm2d {
    /// `relu(self.forward_t(x, train))`, as one fused kernel on the CPU (see `batch_norm_cpu`).
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, true)
    }

    fn run(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let train = train && !self.locked;
        let (weight, bias) = (super::param(&self.weight), super::param(&self.bias));
        let (b, c, h, w) = x.dims4()?;
        let n = b * h * w;
        if train && n < 2 {
            candle_core::bail!("BatchNorm in training mode needs more than one value per channel (got batch {b} of {h}×{w}): use a batch size of at least 2")
        }
        if super::dispatch::use_cpu_kernel(x) {
            let x = x.contiguous()?;
            if !train {
                let op = super::batch_norm_cpu::BatchNormEval {
                    eps: self.eps as f32,
                    relu,
                    mean: self.running_mean.as_tensor().to_vec1()?,
                    var: self.running_var.as_tensor().to_vec1()?,
                };
                return x.apply_op3(&weight, &bias, op);
            }
            // One fused kernel per direction (see `batch_norm_cpu`).
            let stats = std::sync::Arc::new(std::sync::Mutex::new(None));
            let op = super::batch_norm_cpu::BatchNormTrain {
                eps: self.eps as f32,
                relu,
                stats: stats.clone(),
            };
            let y = x.apply_op3(&weight, &bias, op)?;
            // Cloned, not taken: the backward pass reads them too.
            let (mean, var) = stats
                .lock()
                .unwrap()
                .clone()
                .expect("the forward pass stores the batch statistics");
            self.update_running_host(&mean, &var, n)?;
            return Ok(y);
        }
        let (mean, var) = if train {
            let mean = x.mean_keepdim((0, 2, 3))?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
            self.update_running(&mean, &var, n)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().detach().reshape((1, c, 1, 1))?,
                self.running_var.as_tensor().detach().reshape((1, c, 1, 1))?,
            )
        };
        let xn = x.broadcast_sub(&mean)?.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = xn
            .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

/// The composed (device-agnostic) training-mode BatchNorm, for comparing with the fused kernel.
pub fn batch_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// The fused CPU kernel (training mode, batch statistics, then a ReLU when `relu`), exposed for
/// tests and benchmarks.
pub fn batch_norm_train_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let op = super::batch_norm_cpu::BatchNormTrain {
        eps: eps as f32,
        relu,
        stats: Default::default(),
    };
    x.contiguous()?.apply_op3(weight, bias, op)
}

/// The fused evaluation-mode kernel (given running statistics, then a ReLU when `relu`), exposed
/// for tests and benchmarks.
pub fn batch_norm_eval_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (mean, var): (&[f32], &[f32]),
    eps: f64,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let op = super::batch_norm_cpu::BatchNormEval {
        eps: eps as f32,
        relu,
        mean: mean.to_vec(),
        var: var.to_vec(),
    };
    x.contiguous()?.apply_op3(weight, bias, op)
}

/// The composed evaluation-mode BatchNorm, for comparing with the fused kernel.
pub fn batch_norm_eval_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (mean, var): (&[f32], &[f32]),
    eps: f64,
) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let mean = Tensor::from_slice(mean, (1, c, 1, 1), x.device())?;
    let var = Tensor::from_slice(var, (1, c, 1, 1), x.device())?;
    let xn = x.broadcast_sub(&mean)?.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}
