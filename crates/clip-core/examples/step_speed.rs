use candle_core::{DType, Device, Tensor};
use clip_core::{ClipConfig, ClipModel};
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = match args.get(1) {
        Some(p) => ClipConfig::from_toml_file(std::path::Path::new(p))?,
        None => ClipConfig::tiny(),
    };
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(16);
    let model = ClipModel::new(&cfg, &Device::Cpu)?;
    let s = cfg.image.image_size;
    let l = 8;
    let images = Tensor::randn(0f32, 1f32, (b, 3, s, s), &Device::Cpu)?;
    let ids = Tensor::rand(0f32, 100f32, (b, l), &Device::Cpu)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((b, l), DType::U32, &Device::Cpu)?;
    for i in 0..5 {
        let t = std::time::Instant::now();
        let e = model.forward(&images, &ids, &mask, true)?;
        let loss = model.loss(&e, None)?;
        let t1 = t.elapsed();
        let _g = loss.backward()?;
        println!(
            "step {i}: fwd {:?} total {:?}  {:.0} pairs/s",
            t1,
            t.elapsed(),
            b as f64 / t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
