use std::sync::{Arc, Mutex};

use candle_core::{Device, ModuleT, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

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
    ///
    /// The shared stream gives one seed per mask (the lock is held for one draw); the mask's
    /// values are a counter-based hash of (seed, index), so they are generated in parallel and
    /// stay the same whatever the thread count.
    fn mask(&self, shape: &[usize], p: f32, device: &Device) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let scale = 1.0 / (1.0 - p);
        let seed: u64 = self.0.lock().unwrap().random();
        let data: Vec<f32> = (0..n)
            .into_par_iter()
            .with_min_len(1 << 14)
            .map(|i| if uniform(seed, i as u64) < p { 0.0 } else { scale })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)
    }
}

/// A uniform f32 in [0, 1) from (seed, counter): SplitMix64's finaliser over the pair.
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted dropout, active only in training mode.
///
/// ```
/// use candle_core::{Device, ModuleT, Tensor};
/// use clip_core::nn::{Dropout, DropoutRng};
///
/// let drop = Dropout::new(0.5, &DropoutRng::new(7));
/// let x = Tensor::ones((1000,), candle_core::DType::F32, &Device::Cpu)?;
/// // Evaluation mode passes the input through.
/// assert_eq!(drop.forward_t(&x, false)?.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
/// // Training mode zeroes about half and scales the rest by 2, so the mean stays about 1.
/// let y = drop.forward_t(&x, true)?.to_vec1::<f32>()?;
/// let zeros = y.iter().filter(|&&v| v == 0.0).count();
/// assert!((400..600).contains(&zeros), "{zeros}");
/// assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
/// # Ok::<(), anyhow::Error>(())
/// ```
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

    /// Whether it drops anything in training mode (p > 0).
    pub fn active(&self) -> bool {
        self.p > 0.0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_about_p_are_scaled_and_follow_the_seed() {
        let rng = DropoutRng::new(7);
        let m = rng.mask(&[200, 500], 0.25, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        // Reseeding replays the same masks; the next mask differs.
        let again = rng.mask(&[200, 500], 0.25, &Device::Cpu).unwrap();
        rng.reseed(7);
        let replay = rng.mask(&[200, 500], 0.25, &Device::Cpu).unwrap();
        assert_eq!(replay.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        assert_ne!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
    }
}
