use std::sync::{Arc, Mutex};

use candle_core::{Device, ModuleT, Tensor};
use rand::{Rng, SeedableRng};

/// The random stream every dropout layer of a model draws from.
///
/// candle cannot seed its CPU RNG, so masks come from this seeded stream instead; the trainer
/// reseeds it at every step from (seed, step), which makes runs repeatable and resumable.
#[derive(Clone)]
pub struct DropoutRng(Arc<Mutex<rand::rngs::StdRng>>);

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))))
    }
    pub fn reseed(&self, seed: u64) {
        *self.0.lock().unwrap() = rand::rngs::StdRng::seed_from_u64(seed);
    }
    /// A keep-mask already scaled by 1/(1-p), as inverted dropout needs.
    fn mask(&self, shape: &[usize], p: f32, device: &Device) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let scale = 1.0 / (1.0 - p);
        let mut rng = self.0.lock().unwrap();
        let data: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)
    }
}

/// Inverted dropout, active only in training mode.
#[derive(Clone)]
pub struct Dropout {
    p: f32,
    rng: DropoutRng,
}

impl Dropout {
    pub fn new(p: f64, rng: &DropoutRng) -> Self {
        Self {
            p: p as f32,
            rng: rng.clone(),
        }
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.rng.mask(x.dims(), self.p, x.device())?;
        x.mul(&mask)
    }
}
