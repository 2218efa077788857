//! AdamW against PyTorch's formula, parameter groups, frozen towers, and saved state.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use clip_core::config::TrainConfig;
use clip_core::optim::AdamW;
use clip_core::params::{Group, Init, ParamStore};

#[test]
fn adamw_follows_pytorch_with_a_learning_rate_per_group() {
    let store = ParamStore::new(&Device::Cpu, 0);
    let w_img = store
        .root(Group::ImageTower, true)
        .param("w", &[2], Init::Const(1.0))
        .unwrap();
    let _w_head = store
        .root(Group::Heads, true)
        .param("h", &[2], Init::Const(1.0))
        .unwrap();
    let cfg = TrainConfig {
        lr_image: 0.1,
        lr_head: 0.01,
        weight_decay: 0.5,
        ..TrainConfig::default()
    };
    let mut opt = AdamW::new(&store, &cfg).unwrap();
    let mut grads = HashMap::new();
    grads.insert("w".to_string(), Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap());
    grads.insert("h".to_string(), Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap());
    opt.step(&grads).unwrap();
    opt.step(&grads).unwrap();
    // PyTorch AdamW by hand, two steps with the same gradient g: m̂ = g, v̂ = g², so each step
    // moves p by −lr·(g/(|g|+eps)) after p ← p·(1 − lr·wd).
    let expect = |lr: f64, wd: f64, g: f64| {
        let mut p = 1.0f64;
        for _ in 0..2 {
            p *= 1.0 - lr * wd;
            p -= lr * g / (g.abs() + 1e-8);
        }
        p
    };
    let img = w_img.to_vec1::<f32>().unwrap();
    // The image tower has no weight decay (as in the tutorial); the heads have it.
    assert!((img[0] as f64 - expect(0.1, 0.0, 0.5)).abs() < 1e-5, "{img:?}");
    assert!((img[1] as f64 - expect(0.1, 0.0, -2.0)).abs() < 1e-5, "{img:?}");
    let head = store.get("h").unwrap().var.as_tensor().to_vec1::<f32>().unwrap();
    assert!((head[0] as f64 - expect(0.01, 0.5, 0.5)).abs() < 1e-5, "{head:?}");
    assert_eq!(opt.step, 2);
}

#[test]
fn frozen_parameters_get_no_optimiser_state_and_state_round_trips() {
    let store = ParamStore::new(&Device::Cpu, 0);
    store
        .root(Group::ImageTower, false)
        .param("frozen", &[3], Init::Const(1.0))
        .unwrap();
    store
        .root(Group::TextTower, true)
        .param("t", &[3], Init::Const(1.0))
        .unwrap();
    let cfg = TrainConfig::default();
    let mut opt = AdamW::new(&store, &cfg).unwrap();
    assert_eq!(opt.names().collect::<Vec<_>>(), vec!["t"]);
    let mut grads = HashMap::new();
    grads.insert("t".to_string(), Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu).unwrap());
    opt.step(&grads).unwrap();
    opt.scale_lr(0.5);
    let dir = tempfile::tempdir().unwrap();
    clip_core::checkpoint::save_optimizer(&opt, &dir.path().join("opt.safetensors")).unwrap();

    let mut again = AdamW::new(&store, &cfg).unwrap();
    clip_core::checkpoint::load_optimizer(&mut again, &dir.path().join("opt.safetensors")).unwrap();
    assert_eq!(again.step, 1);
    assert_eq!(again.groups, opt.groups);
    // The same next step from the same state.
    let before = store.get("t").unwrap().var.as_tensor().copy().unwrap();
    opt.step(&grads).unwrap();
    let a = store.get("t").unwrap().var.as_tensor().to_vec1::<f32>().unwrap();
    store.get("t").unwrap().var.set(&before).unwrap();
    again.step(&grads).unwrap();
    let b = store.get("t").unwrap().var.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
}
