//! Picking the device: `auto | cpu | cuda[:N] | metal`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Features this build was compiled with, for the environment report.
pub fn compiled_features() -> Vec<&'static str> {
    let mut f = vec![];
    if cfg!(feature = "cuda") {
        f.push("cuda")
    }
    if cfg!(feature = "cudnn") {
        f.push("cudnn")
    }
    if cfg!(feature = "metal") {
        f.push("metal")
    }
    if cfg!(feature = "mkl") {
        f.push("mkl")
    }
    if cfg!(feature = "accelerate") {
        f.push("accelerate")
    }
    f
}

/// Parses a device name. `auto` takes a GPU when one is compiled in and present, else the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        "metal" => {
            if !cfg!(feature = "metal") {
                bail!("this build has no Metal support: rebuild with `--features metal`")
            }
            Ok(Device::new_metal(0)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !cfg!(feature = "cuda") {
                bail!("this build has no CUDA support: rebuild with `--features cuda` (or use --device cpu)")
            }
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("bad CUDA ordinal in {s:?}: expected cuda:0, cuda:1, …"))?,
                None => 0,
            };
            match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
                Ok(Ok(d)) => Ok(d),
                Ok(Err(e)) => bail!("cannot open CUDA device {ordinal}: {e}"),
                Err(_) => bail!("cannot open CUDA device {ordinal}: the CUDA driver (libcuda) could not be loaded"),
            }
        }
        _ => bail!("unknown device {name:?}: use auto, cpu, cuda, cuda:N or metal"),
    }
}

fn auto_device() -> Device {
    if cfg!(feature = "cuda") {
        // A dlopen-built CUDA binary panics inside candle when libcuda is absent: fall back quietly.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let d = std::panic::catch_unwind(|| Device::cuda_if_available(0));
        std::panic::set_hook(prev);
        if let Ok(Ok(d)) = d {
            return d;
        }
    }
    if cfg!(feature = "metal") {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

/// A short human name for a device.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
