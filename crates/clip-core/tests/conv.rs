//! Our differentiable im2col convolution against candle's native one, values and gradients.

use candle_core::{Device, Tensor, Var};
use clip_core::nn::conv2d_im2col;

fn pseudo(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts two computations of the same function agree in value and in the gradient of a fixed
/// weighted sum of their outputs with respect to each of `vars`.
fn assert_same(ours: Tensor, theirs: Tensor, vars: &[&Var], tol: f32, what: &str) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}");
    let d = max_diff(&ours, &theirs);
    assert!(d < 1e-4, "{what}: forward differs by {d}");
    let weights = Tensor::from_vec(pseudo(ours.elem_count(), 3.0), ours.dims(), &Device::Cpu).unwrap();
    let g1 = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    for v in vars {
        let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
        assert!(d < tol, "{what}: gradient differs by {d}");
    }
}

#[test]
fn im2col_convolution_matches_candle_forward_and_backward() {
    for &(c, o, h, w, k, s, p) in &[
        (3, 4, 9, 9, 7, 2, 3),
        (4, 6, 8, 8, 3, 1, 1),
        (4, 6, 9, 7, 3, 2, 1),
        (5, 8, 8, 8, 1, 2, 0),
        (5, 3, 6, 6, 1, 1, 0),
    ] {
        let x = Var::from_tensor(&Tensor::from_vec(pseudo(2 * c * h * w, 1.0), (2, c, h, w), &Device::Cpu).unwrap())
            .unwrap();
        let kk = Var::from_tensor(&Tensor::from_vec(pseudo(o * c * k * k, 7.0), (o, c, k, k), &Device::Cpu).unwrap())
            .unwrap();
        let ours = conv2d_im2col(x.as_tensor(), kk.as_tensor(), s, p).unwrap();
        let theirs = x.as_tensor().conv2d(kk.as_tensor(), p, s, 1, 1).unwrap();
        assert_same(ours, theirs, &[&x, &kk], 1e-4, &format!("{:?}", (c, o, h, w, k, s, p)));
    }
}

#[test]
fn cpu_kernel_matches_candle_forward_and_backward() {
    use clip_core::nn::conv2d_cpu;
    for &(b, c, o, h, w, k, s, p) in &[
        (2, 2, 3, 2, 2, 3, 2, 1),
        (2, 2, 3, 4, 4, 7, 2, 3),
        (2, 3, 2, 5, 5, 3, 1, 0),
        (3, 3, 4, 9, 9, 7, 2, 3),
        (2, 4, 6, 8, 8, 3, 1, 1),
        (5, 4, 6, 9, 7, 3, 2, 1),
        (2, 5, 8, 8, 8, 1, 2, 0),
        (3, 5, 3, 6, 6, 1, 1, 0),
        // Maps of 256+ positions (and single images): one GEMM per image, the batch split over
        // threads, forward's kept columns read image by image in the weight gradient.
        (1, 2, 3, 17, 17, 3, 1, 1),
        (5, 2, 3, 17, 16, 3, 1, 1),
        (3, 3, 2, 40, 40, 7, 2, 3),
    ] {
        // Without gradients nothing is kept, and forward gives the same values.
        let (xt, wt) = (
            Tensor::from_vec(pseudo(b * c * h * w, 2.0), (b, c, h, w), &Device::Cpu).unwrap(),
            Tensor::from_vec(pseudo(o * c * k * k, 5.0), (o, c, k, k), &Device::Cpu).unwrap(),
        );
        let plain = conv2d_cpu(&xt, &wt, s, p).unwrap();
        assert!(max_diff(&plain, &xt.conv2d(&wt, p, s, 1, 1).unwrap()) < 1e-3);
        let x = Var::from_tensor(&Tensor::from_vec(pseudo(b * c * h * w, 2.0), (b, c, h, w), &Device::Cpu).unwrap())
            .unwrap();
        let kk = Var::from_tensor(&Tensor::from_vec(pseudo(o * c * k * k, 5.0), (o, c, k, k), &Device::Cpu).unwrap())
            .unwrap();
        let ours = conv2d_cpu(x.as_tensor(), kk.as_tensor(), s, p).unwrap();
        let theirs = x.as_tensor().conv2d(kk.as_tensor(), p, s, 1, 1).unwrap();
        assert_same(
            ours,
            theirs,
            &[&x, &kk],
            1e-3,
            &format!("{:?}", (b, c, o, h, w, k, s, p)),
        );
    }
}

#[test]
fn fused_batch_norm_matches_the_composed_one_forward_and_backward() {
    use clip_core::nn::{batch_norm_reference, batch_norm_train_cpu};
    let (b, c, h, w) = (3, 4, 5, 6);
    let x = Var::from_tensor(
        &(Tensor::from_vec(pseudo(b * c * h * w, 1.5), (b, c, h, w), &Device::Cpu).unwrap() * 3.0).unwrap(),
    )
    .unwrap();
    let g = Var::from_tensor(&Tensor::new(&[1.0f32, 0.5, -2.0, 1.5], &Device::Cpu).unwrap()).unwrap();
    let be = Var::from_tensor(&Tensor::new(&[0.1f32, -0.3, 0.0, 2.0], &Device::Cpu).unwrap()).unwrap();
    let ours = batch_norm_train_cpu(x.as_tensor(), g.as_tensor(), be.as_tensor(), 1e-5, false).unwrap();
    let theirs = batch_norm_reference(x.as_tensor(), g.as_tensor(), be.as_tensor(), 1e-5).unwrap();
    assert_same(ours, theirs, &[&x, &g, &be], 1e-3, "batch norm");
}

#[test]
fn fused_layer_norm_matches_the_composed_one_forward_and_backward() {
    use clip_core::nn::{layer_norm_cpu, layer_norm_reference};
    // 150 rows: more than one parallel work item, with a partial last one.
    let (r, d) = (150, 12);
    let x =
        Var::from_tensor(&(Tensor::from_vec(pseudo(r * d, 4.5), (3, r / 3, d), &Device::Cpu).unwrap() * 2.0).unwrap())
            .unwrap();
    let g = Var::from_tensor(&Tensor::from_vec(pseudo(d, 8.0), d, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(pseudo(d, 2.0), d, &Device::Cpu).unwrap()).unwrap();
    let ours = layer_norm_cpu(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    let theirs = layer_norm_reference(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    assert_same(ours, theirs, &[&x, &g, &b], 1e-3, "layer norm");
}
