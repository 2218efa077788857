use candle_core::{DType, Device, Tensor};
use clip_core::{ClipConfig, ClipModel};
fn main() -> anyhow::Result<()> {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::new(&cfg, &Device::Cpu)?;
    let b = 16;
    let s = cfg.image.image_size;
    let l = 12;
    let images = Tensor::randn(0f32, 1f32, (b, 3, s, s), &Device::Cpu)?;
    let ids = Tensor::rand(0f32, 100f32, (b, l), &Device::Cpu)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((b, l), DType::U32, &Device::Cpu)?;
    for i in 0..5 {
        let t = std::time::Instant::now();
        let e = model.forward(&images, &ids, &mask, true)?;
        let loss = model.loss(&e)?;
        let t1 = t.elapsed();
        let _g = loss.backward()?;
        println!("step {i}: fwd {:?} total {:?}", t1, t.elapsed());
    }
    Ok(())
}
