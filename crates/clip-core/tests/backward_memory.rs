//! The vendored candle-core frees a forward activation during the backward pass once nothing but
//! the graph holds it (vendor/README.md). What must not change: the gradients, and the values of
//! every tensor the caller still holds.

use candle_core::{Device, Tensor, Var};
use clip_core::config::ClipConfig;
use clip_core::model::ClipModel;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn held_tensors_keep_their_values_and_gradients_do_not_change() {
    let x = Var::from_tensor(
        &Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap(),
    )
    .unwrap();
    let chain = |x: &Tensor| {
        let a = (x * 0.1).unwrap().exp().unwrap();
        let b = a.sqr().unwrap();
        let c = b.reshape(12).unwrap();
        (a, (c.sum_all().unwrap() + b.sum_all().unwrap()).unwrap())
    };
    // The caller holds the intermediate `a`: it stays readable after backward.
    let (a, loss) = chain(x.as_tensor());
    let before = flat(&a);
    let held = loss.backward().unwrap();
    assert_eq!(flat(&a), before, "a held tensor lost its values");
    assert!(loss.to_scalar::<f32>().is_ok(), "the loss itself stays readable");
    // Dropped before backward: `a` may be freed; the gradient is the same, bit for bit.
    let (a2, loss2) = chain(x.as_tensor());
    drop(a2);
    let freed = loss2.backward().unwrap();
    let (g1, g2) = (held.get(x.as_tensor()).unwrap(), freed.get(x.as_tensor()).unwrap());
    assert_eq!(flat(g1), flat(g2));
    // d/dx Σ 2·e^(0.2x) = 0.4·e^(0.2x).
    for (g, v) in flat(g1).iter().zip(flat(x.as_tensor())) {
        assert!((g - 0.4 * (0.2 * v).exp()).abs() < 1e-4 * g.abs().max(1.0));
    }
}

#[test]
fn a_model_step_gives_the_same_gradients_whether_or_not_activations_are_freed() {
    // Holding the embeddings and the loss (as a training loop does) against holding nothing but
    // the loss: every parameter's gradient identical.
    let cfg = ClipConfig::preset("tiny").unwrap();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let size = cfg.image.image_size;
    let images = Tensor::rand(0f32, 1., (4, 3, size, size), &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[
            [101u32, 7, 8, 102],
            [101, 9, 10, 102],
            [101, 11, 12, 102],
            [101, 13, 14, 102],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::ones((4, 4), candle_core::DType::U32, &Device::Cpu).unwrap();
    let grads = |keep: bool| {
        // Evaluation mode: no dropout, so both passes compute the same thing.
        let e = model.forward(&images, &ids, &mask, false).unwrap();
        let loss = model.loss(&e, None).unwrap();
        let kept = keep.then(|| (e.image.clone(), e.text.clone()));
        let g = loss.backward().unwrap();
        if let Some((i, t)) = kept {
            assert!(flat(&i).iter().chain(flat(&t).iter()).all(|v| v.is_finite()));
        }
        model
            .params
            .trainable()
            .into_iter()
            .map(|(name, _, v)| (name, flat(g.get(v.as_tensor()).unwrap())))
            .collect::<Vec<_>>()
    };
    let (a, b) = (grads(true), grads(false));
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

#[test]
fn a_second_backward_through_a_freed_graph_is_an_error_not_a_panic() {
    // PyTorch refuses a second backward through one graph; here the first one freed the
    // activations the fused kernels' backward reads, and the second says so.
    let w = Var::from_tensor(&Tensor::ones((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((2, 4)).unwrap();
    let b = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    // The linear layer's output is held by the graph alone: GELU's backward reads it.
    let loss = clip_core::nn::gelu_cpu(&clip_core::nn::linear_cpu(&x, w.as_tensor(), &b).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let first = loss.backward().unwrap();
    assert!(first.get(w.as_tensor()).is_some());
    let err = loss
        .backward()
        .expect_err("the graph's activations were freed")
        .to_string();
    assert!(err.contains("whose backward already ran"), "{err}");
}

#[test]
fn a_second_backward_through_candles_own_composed_ops_is_an_error_before_any_kernel_runs() {
    // Only candle's ops: its CPU matmul's backward reads the freed `exp` output. Before the graph
    // was checked, the second pass handed that empty buffer to the GEMM (out-of-bounds reads).
    let d = &Device::Cpu;
    let w = Var::from_tensor(&Tensor::arange(0f32, 12., d).unwrap().reshape((3, 4)).unwrap()).unwrap();
    let v = Var::from_tensor(&(Tensor::ones((4, 5), candle_core::DType::F32, d).unwrap() * 0.1).unwrap()).unwrap();
    let x = (Tensor::arange(0f32, 6., d).unwrap().reshape((2, 3)).unwrap() * 0.05).unwrap();
    let h = x.matmul(w.as_tensor()).unwrap().exp().unwrap();
    let loss = h.matmul(v.as_tensor()).unwrap().tanh().unwrap().sum_all().unwrap();
    drop(h);
    let first = loss.backward().unwrap();
    let gw = flat(first.get(w.as_tensor()).unwrap());
    assert!(gw.iter().all(|g| g.is_finite()) && gw.iter().any(|g| *g != 0.0));
    for _ in 0..2 {
        let err = loss
            .backward()
            .expect_err("the graph's activations were freed")
            .to_string();
        assert!(
            err.contains("whose backward already ran") && err.contains("run the forward pass again"),
            "{err}"
        );
    }
    // The caller's tensors are untouched: a new forward pass trains as before.
    let again = x
        .matmul(w.as_tensor())
        .unwrap()
        .exp()
        .unwrap()
        .matmul(v.as_tensor())
        .unwrap()
        .tanh()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(flat(again.get(w.as_tensor()).unwrap()), gw);
}
