//! AdamW with PyTorch semantics, parameter groups and saveable state.
//!
//! `candle_nn::AdamW` has one learning rate and no way to save its moments, so a resumed run would
//! restart its bias correction and drift from an uninterrupted one. This one keeps per-group
//! learning rates (image tower / text tower / heads, as the tutorial) and saves everything.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::nn::dispatch::{host_f32, host_f32_mut, use_cpu_kernel};
use crate::params::{Group, ParamStore};

/// Hyper-parameters of one group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct GroupSettings {
    pub lr: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    group: Group,
    var: Var,
    moments: Moments,
    /// Multiplies the group's learning rate (layer-wise decay; 1 otherwise).
    lr_scale: f64,
    /// Whether the group's weight decay applies (not to biases and norms when the towers decay).
    decays: bool,
}

/// Adam's first and second moments of one parameter.
enum Moments {
    /// Host vectors, updated in place with the parameter by one fused pass ([`AdamStep`]).
    Host(Mutex<(Vec<f32>, Vec<f32>)>),
    /// Tensors on the parameter's device, updated with tensor ops.
    Device { m: Var, v: Var },
}

impl Moments {
    fn tensors(&self, shape: &candle_core::Shape) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host(mv) => {
                let mv = mv.lock().unwrap();
                (
                    Tensor::from_slice(&mv.0, shape, &Device::Cpu)?,
                    Tensor::from_slice(&mv.1, shape, &Device::Cpu)?,
                )
            }
            Moments::Device { m, v } => (
                m.as_tensor().to_device(&Device::Cpu)?,
                v.as_tensor().to_device(&Device::Cpu)?,
            ),
        })
    }

    fn set(&self, m: &Tensor, v: &Tensor) -> Result<()> {
        match self {
            Moments::Host(mv) => {
                let mut mv = mv.lock().unwrap();
                let host =
                    |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
                let (m, v) = (host(m)?, host(v)?);
                if m.len() != mv.0.len() || v.len() != mv.1.len() {
                    bail!(
                        "optimiser moments of {} values for a parameter of {}",
                        m.len(),
                        mv.0.len()
                    )
                }
                *mv = (m, v);
            }
            Moments::Device { m: vm, v: vv } => {
                let dev = vm.device();
                vm.set(&m.to_device(dev)?)?;
                vv.set(&v.to_device(dev)?)?;
            }
        }
        Ok(())
    }
}

pub struct AdamW {
    slots: Vec<Slot>,
    /// Current settings per group (the scheduler changes `lr`).
    pub groups: BTreeMap<Group, GroupSettings>,
    /// Settings the run started with; schedules scale from these.
    pub base: BTreeMap<Group, GroupSettings>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimiser steps taken (for bias correction).
    pub step: u64,
}

/// Gradients by parameter name (accumulated over micro-batches when asked).
pub type Grads = HashMap<String, Tensor>;

impl AdamW {
    /// Groups as the tutorial: heads get `weight_decay`, the towers none; a frozen tower's
    /// parameters are not trainable and get no state at all.
    ///
    /// With `decay_towers` (a pretrained start), every group decays, but only weight matrices
    /// (rank ≥ 2), as open_clip excludes biases, norms and `logit_scale`.
    pub fn new(params: &ParamStore, cfg: &TrainConfig) -> Result<Self> {
        let tower_decay = if cfg.decay_towers { cfg.weight_decay } else { 0.0 };
        let mut groups = BTreeMap::new();
        groups.insert(
            Group::ImageTower,
            GroupSettings {
                lr: cfg.lr_image,
                weight_decay: tower_decay,
            },
        );
        groups.insert(
            Group::TextTower,
            GroupSettings {
                lr: cfg.lr_text,
                weight_decay: tower_decay,
            },
        );
        groups.insert(
            Group::Heads,
            GroupSettings {
                lr: cfg.lr_head,
                weight_decay: cfg.weight_decay,
            },
        );
        let mut slots = vec![];
        for (name, group, var) in params.trainable() {
            // The one place the optimiser chooses its kernel, per parameter.
            let moments = if use_cpu_kernel(var.as_tensor()) && var.is_contiguous() {
                let n = var.elem_count();
                Moments::Host(Mutex::new((vec![0f32; n], vec![0f32; n])))
            } else {
                let zeros = var.as_tensor().zeros_like()?.detach();
                Moments::Device {
                    m: Var::from_tensor(&zeros)?,
                    v: Var::from_tensor(&zeros)?,
                }
            };
            slots.push(Slot {
                name,
                group,
                lr_scale: 1.0,
                decays: !cfg.decay_towers || var.rank() >= 2,
                moments,
                var,
            });
        }
        Ok(Self {
            slots,
            base: groups.clone(),
            groups,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
        })
    }

    /// Scales each parameter's learning rate by `scale(name)` (layer-wise decay, see
    /// [`crate::model::blocks::lr_scale`]).
    pub fn with_lr_scales(mut self, scale: impl Fn(&str) -> f64) -> Self {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
        self
    }

    /// Names of the parameters this optimiser updates.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Collects each trainable parameter's gradient by name (missing ones are left out).
    pub fn grads_by_name(&self, grads: &GradStore) -> Grads {
        self.slots
            .iter()
            .filter_map(|s| grads.get(s.var.as_tensor()).map(|g| (s.name.clone(), g.clone())))
            .collect()
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut total = 0f64;
        for g in grads.values() {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// One AdamW update. Parameters without a gradient are skipped, as PyTorch skips `grad=None`.
    ///
    /// Returns the global L2 norm of the gradients it applied, computed in the same pass on the
    /// CPU (so a caller that does not clip needs no separate pass over the gradients).
    pub fn step(&mut self, grads: &Grads) -> Result<f64> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let update = |s: &Slot| -> Result<f64> {
            let Some(g) = grads.get(&s.name) else {
                return Ok(0.0);
            };
            let GroupSettings { lr, weight_decay } = self.groups[&s.group];
            let lr = lr * s.lr_scale;
            let weight_decay = if s.decays { weight_decay } else { 0.0 };
            match &s.moments {
                Moments::Host(mv) => {
                    let op = AdamStep {
                        moments: mv,
                        lr: lr as f32,
                        decay: (1.0 - lr * weight_decay) as f32,
                        b1: b1 as f32,
                        b2: b2 as f32,
                        eps: eps as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        sum_sq: Mutex::new(0.0),
                    };
                    let g = g.detach().to_dtype(DType::F32)?.contiguous()?;
                    s.var.as_tensor().inplace_op2(&g, &op)?;
                    let sum_sq = *op.sum_sq.lock().unwrap();
                    Ok(sum_sq)
                }
                Moments::Device { m: vm, v: vv } => {
                    let p = s.var.as_tensor().detach();
                    let g = g.detach();
                    let sum_sq = g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    let m = ((vm.as_tensor() * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((vv.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    // Decoupled weight decay first (p ← p − lr·wd·p), then the Adam step.
                    let p = if weight_decay > 0.0 {
                        (&p * (1.0 - lr * weight_decay))?
                    } else {
                        p
                    };
                    let denom = ((&v / bc2)?.sqrt()? + eps)?;
                    let update = ((&m / bc1)? / denom)?;
                    let p = (p - (update * lr)?)?;
                    vm.set(&m)?;
                    vv.set(&v)?;
                    s.var.set(&p)?;
                    Ok(sum_sq)
                }
            }
        };
        // Parameters are independent: update them in parallel.
        let sums = self.slots.par_iter().map(update).collect::<Result<Vec<f64>>>()?;
        Ok(sums.iter().sum::<f64>().sqrt())
    }

    /// Sets every group's learning rate to `factor` × its base.
    pub fn scale_lr(&mut self, factor: f64) {
        for (g, s) in self.groups.iter_mut() {
            s.lr = self.base[g].lr * factor;
        }
    }

    /// The moments by name (`m.NAME`, `v.NAME`), on the CPU, for saving.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for s in &self.slots {
            let (m, v) = s.moments.tensors(s.var.shape())?;
            tensors.insert(format!("m.{}", s.name), m);
            tensors.insert(format!("v.{}", s.name), v);
        }
        Ok(tensors)
    }

    /// Everything but the moments: step count and group settings.
    pub fn meta(&self) -> OptimMeta {
        OptimMeta {
            step: self.step,
            groups: self.groups.clone(),
            base: self.base.clone(),
        }
    }

    /// Restores the state saved by [`AdamW::state_tensors`] and [`AdamW::meta`].
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, meta: OptimMeta) -> Result<()> {
        for s in &self.slots {
            let (Some(m), Some(v)) = (
                tensors.get(&format!("m.{}", s.name)),
                tensors.get(&format!("v.{}", s.name)),
            ) else {
                bail!("no moments for {} — was it saved with other frozen towers?", s.name)
            };
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                bail!(
                    "optimiser state: moments of {} have shape {:?}, the parameter {:?}",
                    s.name,
                    m.dims(),
                    s.var.dims()
                )
            }
            s.moments.set(m, v)?;
        }
        self.step = meta.step;
        self.groups = meta.groups;
        self.base = meta.base;
        Ok(())
    }
}

/// Partial sums kept side by side in the vectorised loop.
const LANES: usize = 16;

/// Elements per parallel work item of the fused update: large tensors (the word-embedding table)
/// are split across threads, small ones stay whole.
const ADAM_CHUNK: usize = 1 << 16;

/// The whole AdamW update of one parameter as one pass over (p, m, v, g), in place: on the CPU the
/// ten tensor ops per parameter of the composed update cost more than the arithmetic. Also sums
/// g² for the gradient norm.
struct AdamStep<'a> {
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
    lr: f32,
    /// 1 − lr·weight_decay (decoupled weight decay, applied before the Adam step as PyTorch).
    decay: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    sum_sq: Mutex<f64>,
}

impl candle_core::InplaceOp2 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "clipmine-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let p = host_f32_mut("adamw", s1, l1)?;
        let g = host_f32("adamw", s2, l2)?;
        let mut mv = self.moments.lock().unwrap();
        let (m, v) = &mut *mv;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "adamw: gradient {:?} does not match parameter {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let AdamStep {
            lr,
            decay,
            b1,
            b2,
            eps,
            bc1,
            bc2,
            ..
        } = *self;
        let (step_size, rbc2) = (lr / bc1, 1.0 / bc2);
        let sum_sq: f64 = p
            .par_chunks_mut(ADAM_CHUNK)
            .zip(m.par_chunks_mut(ADAM_CHUNK))
            .zip(v.par_chunks_mut(ADAM_CHUNK).zip(g.par_chunks(ADAM_CHUNK)))
            .map(|((p, m), (v, g))| {
                // LANES independent partial sums: one running sum is a dependency chain that
                // keeps the compiler from vectorising the whole loop (it was 7 % of a `tiny` step).
                let mut sq = [0f32; LANES];
                let lanes = p
                    .chunks_mut(LANES)
                    .zip(m.chunks_mut(LANES))
                    .zip(v.chunks_mut(LANES).zip(g.chunks(LANES)));
                for ((p, m), (v, g)) in lanes {
                    // Zipped, so no index is bounds-checked and the lanes vectorise.
                    let each = p
                        .iter_mut()
                        .zip(m.iter_mut())
                        .zip(v.iter_mut().zip(g.iter().zip(&mut sq)));
                    for ((p, m), (v, (&g, sq))) in each {
                        *sq += g * g;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *p = *p * decay - step_size * *m / ((*v * rbc2).sqrt() + eps);
                    }
                }
                sq.iter().map(|&s| s as f64).sum::<f64>()
            })
            .sum();
        *self.sum_sq.lock().unwrap() = sum_sq;
        Ok(())
    }
}

/// The optimiser's state besides its moments (saved as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimMeta {
    pub step: u64,
    pub groups: BTreeMap<Group, GroupSettings>,
    pub base: BTreeMap<Group, GroupSettings>,
}
