//! Every fused CPU kernel against the composed (device-agnostic) path and against central finite
//! differences: values, and the gradients of a fixed weighted sum of the output for every input.

use candle_core::{Device, Tensor, Var};
use clip_core::nn;

fn pseudo(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5).collect()
}

fn input(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n = shape.iter().product();
    (Tensor::from_vec(pseudo(n, seed), shape, &Device::Cpu).unwrap() * scale as f64).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Σ out·w for a fixed pseudo-random w, in f64 on the host.
fn weighted(out: &Tensor) -> f64 {
    let w = pseudo(out.elem_count(), 3.0);
    flat(out).iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Checks `fused` against `composed` (values and gradients) and the fused gradients against
/// central differences of the fused forward, for every element of every input.
fn check(what: &str, inputs: &[Tensor], fused: Op, composed: Op, fd_eps: f64, fd_tol: f64) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&ts).unwrap(), composed(&ts).unwrap());
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let scale = max_abs(&b).max(1.0);
    let d = max_abs(&(&a - &b).unwrap());
    assert!(d <= 1e-4 * scale, "{what}: forward differs by {d}");
    let w = Tensor::from_vec(pseudo(a.elem_count(), 3.0), a.dims(), &Device::Cpu).unwrap();
    let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (ga, gb) = (
            ga.get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: fused gives input {i} no gradient")),
            gb.get(v.as_tensor()).unwrap(),
        );
        let scale = max_abs(gb).max(1.0);
        let d = max_abs(&(ga - gb).unwrap());
        assert!(
            d <= 1e-3 * scale,
            "{what}: gradient of input {i} differs from the composed one by {d}"
        );
        // Central differences of the fused forward, element by element.
        let analytic = flat(ga);
        let base: Vec<Vec<f32>> = inputs.iter().map(flat).collect();
        for j in 0..base[i].len() {
            let at = |delta: f64| {
                let mut xs: Vec<Tensor> = inputs.to_vec();
                let mut data = base[i].clone();
                data[j] = (data[j] as f64 + delta) as f32;
                xs[i] = Tensor::from_vec(data, inputs[i].dims(), &Device::Cpu).unwrap();
                weighted(&fused(&xs).unwrap())
            };
            let numeric = (at(fd_eps) - at(-fd_eps)) / (2.0 * fd_eps);
            let err = (numeric - analytic[j] as f64).abs();
            assert!(
                err <= fd_tol * (1.0 + numeric.abs()),
                "{what}: input {i}[{j}]: finite differences {numeric}, backward {}",
                analytic[j]
            );
        }
    }
}

#[test]
fn gelu_kernel() {
    let x = input(&[3, 37], 1.0, 8.0);
    check(
        "gelu",
        &[x],
        &|t| nn::gelu_cpu(&t[0]),
        &|t| nn::gelu_reference(&t[0]),
        1e-2,
        2e-3,
    );
}

#[test]
fn softmax_kernel() {
    // Rows of 5 (few per work item) and of 300 (several work items), with a −1e9 mask column.
    let x = input(&[2, 3, 5], 2.0, 6.0);
    check(
        "softmax",
        &[x],
        &|t| nn::softmax_cpu(&t[0]),
        &|t| nn::softmax_reference(&t[0]),
        1e-2,
        2e-3,
    );
    let big = input(&[60, 300], 4.0, 4.0);
    let vars = Var::from_tensor(&big).unwrap();
    let (a, b) = (
        nn::softmax_cpu(vars.as_tensor()).unwrap(),
        nn::softmax_reference(vars.as_tensor()).unwrap(),
    );
    assert!(max_abs(&(a - b).unwrap()) < 1e-6);
    let masked = Tensor::cat(
        &[
            input(&[4, 3], 5.0, 3.0),
            Tensor::full(-1e9f32, (4, 1), &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let y = flat(&nn::softmax_cpu(&masked).unwrap());
    assert!(y.iter().skip(3).step_by(4).all(|&p| p == 0.0), "{y:?}");
}

#[test]
fn max_pool_kernel() {
    // Distinct values (a permutation), so no window has a tie within the finite-difference step.
    for (h, w) in [(7, 7), (8, 6), (5, 9), (2, 3)] {
        let n = 2 * 3 * h * w;
        let data: Vec<f32> = (0..n).map(|i| ((i * 37 + 11) % n) as f32 * 0.1).collect();
        let x = Tensor::from_vec(data, (2, 3, h, w), &Device::Cpu).unwrap();
        check(
            &format!("max-pool {h}×{w}"),
            &[x],
            &|t| nn::max_pool_3x3_s2_cpu(&t[0]),
            &|t| nn::max_pool_3x3_s2_reference(&t[0]),
            1e-2,
            1e-3,
        );
    }
}

#[test]
fn max_pool_without_a_backward_gives_the_same_values() {
    // Without gradients the pool takes window maxima separably and notes no arg-max.
    for (h, w) in [(7, 7), (8, 6), (5, 9), (2, 3), (1, 1), (32, 32)] {
        let x = input(&[2, 3, h, w], 1.5, 4.0);
        let tracked = Var::from_tensor(&x).unwrap();
        let (plain, noted) = (
            nn::max_pool_3x3_s2_cpu(&x).unwrap(),
            nn::max_pool_3x3_s2_cpu(tracked.as_tensor()).unwrap(),
        );
        assert_eq!(flat(&plain), flat(&noted), "{h}×{w}");
        assert_eq!(
            flat(&plain),
            flat(&nn::max_pool_3x3_s2_reference(&x).unwrap()),
            "{h}×{w}"
        );
    }
}

#[test]
fn layer_norm_kernel() {
    let x = input(&[2, 5, 12], 4.5, 4.0);
    let g = input(&[12], 8.0, 2.0);
    let b = input(&[12], 2.0, 1.0);
    check(
        "layer norm",
        &[x, g, b],
        &|t| nn::layer_norm_cpu(&t[0], &t[1], &t[2], 1e-5),
        &|t| nn::layer_norm_reference(&t[0], &t[1], &t[2], 1e-5),
        1e-2,
        5e-3,
    );
}

#[test]
fn batch_norm_kernel() {
    let x = input(&[3, 4, 3, 2], 1.5, 6.0);
    let g = Tensor::new(&[1.0f32, 0.5, -2.0, 1.5], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.1f32, -0.3, 0.0, 2.0], &Device::Cpu).unwrap();
    check(
        "batch norm",
        &[x, g, b],
        &|t| nn::batch_norm_train_cpu(&t[0], &t[1], &t[2], 1e-5, false),
        &|t| nn::batch_norm_reference(&t[0], &t[1], &t[2], 1e-5),
        1e-2,
        5e-3,
    );
}

#[test]
fn batch_norm_relu_kernel() {
    // About half the outputs clamp; none sits within the finite-difference step of the kink.
    let x = input(&[3, 4, 3, 2], 1.5, 6.0);
    let g = Tensor::new(&[1.0f32, 0.5, -2.0, 1.5], &Device::Cpu).unwrap();
    // Every pre-activation is ≥ 0.057 away from the kink (checked in numpy).
    let b = Tensor::new(&[0.1f32, -0.3, 0.05, 0.4], &Device::Cpu).unwrap();
    let y = flat(&nn::batch_norm_train_cpu(&x, &g, &b, 1e-5, true).unwrap());
    let zeros = y.iter().filter(|&&v| v == 0.0).count();
    assert!(zeros > 10 && zeros < y.len() - 10, "{zeros} of {} clamped", y.len());
    check(
        "batch norm + relu",
        &[x, g, b],
        &|t| nn::batch_norm_train_cpu(&t[0], &t[1], &t[2], 1e-5, true),
        &|t| nn::batch_norm_reference(&t[0], &t[1], &t[2], 1e-5)?.relu(),
        1e-3,
        5e-3,
    );
}

#[test]
fn batch_norm_eval_kernel() {
    let x = input(&[2, 3, 2, 3], 2.5, 4.0);
    let g = Tensor::new(&[1.0f32, -0.5, 2.0], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.2f32, -0.1, 0.3], &Device::Cpu).unwrap();
    let stats: (&[f32], &[f32]) = (&[0.1, -0.2, 0.05], &[1.5, 0.7, 2.0]);
    for relu in [false, true] {
        check(
            &format!("batch norm (evaluation, relu {relu})"),
            &[x.clone(), g.clone(), b.clone()],
            &|t| nn::batch_norm_eval_cpu(&t[0], &t[1], &t[2], stats, 1e-5, relu),
            &|t| {
                let y = nn::batch_norm_eval_reference(&t[0], &t[1], &t[2], stats, 1e-5)?;
                if relu {
                    y.relu()
                } else {
                    Ok(y)
                }
            },
            1e-3,
            5e-3,
        );
    }
}

#[test]
fn add_relu_kernel() {
    // More elements than one work item holds, so the chunks are covered too.
    for shape in [&[2, 3, 4, 5][..], &[3, 40_000][..]] {
        let a = input(shape, 1.0, 4.0);
        let b = input(shape, 7.0, 4.0);
        let y = flat(&nn::add_relu_cpu(&a, &b).unwrap());
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!(
            zeros > y.len() / 4 && zeros < y.len() * 3 / 4,
            "{zeros} of {} clamped",
            y.len()
        );
        if y.len() > 1000 {
            // Values and gradients only: finite differences over 240,000 inputs take too long.
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let fused = nn::add_relu_cpu(va.as_tensor(), vb.as_tensor()).unwrap();
            let composed = nn::add_relu_reference(va.as_tensor(), vb.as_tensor()).unwrap();
            assert!(flat(&fused) == flat(&composed), "add + relu: values differ");
            let w = input(shape, 3.0, 1.0);
            let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
            // Where a + b is exactly 0, candle's ReLU passes the gradient and PyTorch's (and
            // this kernel's) does not; elsewhere they must agree exactly.
            let sum = flat(&(&a + &b).unwrap());
            for v in [&va, &vb] {
                let (f, c) = (flat(gf.get(v).unwrap()), flat(gc.get(v).unwrap()));
                let wrong = (0..f.len()).filter(|&i| sum[i] != 0.0 && f[i] != c[i]).count();
                assert_eq!(wrong, 0, "add + relu: {wrong} gradients differ");
                assert!(f.iter().any(|&g| g != 0.0));
            }
            continue;
        }
        check(
            "add + relu",
            &[a, b],
            &|t| nn::add_relu_cpu(&t[0], &t[1]),
            &|t| nn::add_relu_reference(&t[0], &t[1]),
            1e-3,
            2e-3,
        );
    }
}

#[test]
fn conv_kernel() {
    // Small maps take the whole-batch GEMM; ≥ 256 positions per image (or one image) the
    // per-image GEMMs.
    for &(b, c, o, h, w, k, s, p) in &[
        (2, 2, 3, 5, 5, 3, 2, 1),
        (3, 3, 2, 4, 4, 1, 1, 0),
        (2, 2, 2, 5, 4, 3, 1, 1),
        (1, 2, 3, 5, 5, 3, 1, 1),
        (2, 2, 2, 17, 16, 3, 1, 1),
        (2, 2, 3, 16, 16, 1, 1, 0),
        // A stem: 7×7, stride 2, padding 3, on an even and an odd width.
        (2, 2, 3, 11, 10, 7, 2, 3),
        (1, 1, 2, 9, 13, 7, 2, 3),
    ] {
        let x = input(&[b, c, h, w], 2.0, 2.0);
        let wt = input(&[o, c, k, k], 5.0, 1.0);
        check(
            &format!("conv {:?}", (b, c, o, h, w, k, s, p)),
            &[x, wt],
            &|t| nn::conv2d_cpu(&t[0], &t[1], s, p),
            &|t| nn::conv2d_im2col(&t[0], &t[1], s, p),
            1e-2,
            2e-3,
        );
    }
}

#[test]
fn conv_skips_the_input_gradient_of_images_that_need_none() {
    // As in the first convolution: the images are plain tensors, the kernel a variable.
    let x = input(&[2, 3, 9, 9], 2.0, 2.0);
    let w = Var::from_tensor(&input(&[4, 3, 3, 3], 5.0, 1.0)).unwrap();
    let ours = nn::conv2d_cpu(&x, w.as_tensor(), 2, 1).unwrap();
    let reference = nn::conv2d_im2col(&x, w.as_tensor(), 2, 1).unwrap();
    let wt = input(ours.dims(), 3.0, 1.0);
    let g = (&ours * &wt).unwrap().sum_all().unwrap().backward().unwrap();
    let r = (&reference * &wt).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none(), "the images got a gradient");
    let d = max_abs(&(g.get(w.as_tensor()).unwrap() - r.get(w.as_tensor()).unwrap()).unwrap());
    assert!(d <= 1e-4, "weight gradient differs by {d}");
}

#[test]
fn linear_kernel() {
    // (N, in) and (B, L, in) inputs; more than 64 outputs, so the bias sums span column blocks.
    for (x_shape, d_out) in [(&[5, 7][..], 3), (&[2, 3, 6][..], 70)] {
        let d_in = *x_shape.last().unwrap();
        let x = input(x_shape, 1.0, 2.0);
        let w = input(&[d_out, d_in], 4.0, 1.0);
        let b = input(&[d_out], 6.0, 1.0);
        check(
            &format!("linear {x_shape:?} → {d_out}"),
            &[x, w, b],
            &|t| nn::linear_cpu(&t[0], &t[1], &t[2]),
            &|t| nn::linear_reference(&t[0], &t[1], &t[2]),
            1e-2,
            2e-3,
        );
    }
    // A weight large enough to be transposed before the forward GEMM (values and gradients only:
    // finite differences over 75,000 weights take too long).
    let x = Var::from_tensor(&input(&[3, 2, 300], 1.5, 1.0)).unwrap();
    let (w, b) = (
        Var::from_tensor(&input(&[250, 300], 2.5, 0.1)).unwrap(),
        Var::from_tensor(&input(&[250], 3.5, 1.0)).unwrap(),
    );
    let y = nn::linear_cpu(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
    let r = nn::linear_reference(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
    let d = max_abs(&(&y - &r).unwrap());
    assert!(
        d <= 1e-4 * max_abs(&r).max(1.0),
        "transposed-weight linear differs by {d}"
    );
    let wy = input(y.dims(), 7.0, 1.0);
    let (gy, gr) = (
        (&y * &wy).unwrap().sum_all().unwrap().backward().unwrap(),
        (&r * &wy).unwrap().sum_all().unwrap().backward().unwrap(),
    );
    for v in [&x, &w, &b] {
        let (a, c) = (gy.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
        let d = max_abs(&(a - c).unwrap());
        assert!(d <= 1e-4 * max_abs(c).max(1.0), "gradient differs by {d}");
    }
    // An input that needs no gradient (the op skips its GEMM) still gives W and b theirs.
    let x = input(&[4, 5], 2.0, 1.0);
    let (w, b) = (
        Var::from_tensor(&input(&[3, 5], 3.0, 1.0)).unwrap(),
        Var::from_tensor(&input(&[3], 5.0, 1.0)).unwrap(),
    );
    let y = nn::linear_cpu(&x, w.as_tensor(), b.as_tensor()).unwrap();
    let r = nn::linear_reference(&x, w.as_tensor(), b.as_tensor()).unwrap();
    let (gy, gr) = (
        y.sum_all().unwrap().backward().unwrap(),
        r.sum_all().unwrap().backward().unwrap(),
    );
    assert!(gy.get(&x).is_none());
    for v in [&w, &b] {
        let d = max_abs(&(gy.get(v.as_tensor()).unwrap() - gr.get(v.as_tensor()).unwrap()).unwrap());
        assert!(d <= 1e-5, "gradient differs by {d}");
    }
}

#[test]
fn attention_kernel() {
    // 2 heads of 3; a padded key in the second item; all queries, and the first only (as the
    // last layer computes [CLS]).
    let (b, l, d) = (2, 4, 6);
    let mask = Tensor::new(&[[0f32, 0., 0., 0.], [0., 0., 0., -1e9]], &Device::Cpu).unwrap();
    for lq in [l, 1] {
        let q = input(&[b, lq, d], 1.0, 2.0);
        let k = input(&[b, l, d], 4.0, 2.0);
        let v = input(&[b, l, d], 6.0, 2.0);
        let m = mask.clone();
        check(
            &format!("attention, {lq} queries"),
            &[q, k, v],
            &|t| nn::attention_cpu(&t[0], &t[1], &t[2], &m, 2),
            &|t| nn::attention_reference(&t[0], &t[1], &t[2], &m, 2, |w| Ok(w.clone())),
            1e-2,
            3e-3,
        );
    }
    // The padded key gets no weight: changing its value changes nothing.
    let q = input(&[b, l, d], 1.0, 2.0);
    let k = input(&[b, l, d], 4.0, 2.0);
    let v = input(&[b, l, d], 6.0, 2.0);
    let v2 = v
        .slice_assign(
            &[1..2, 3..4, 0..d],
            &Tensor::full(9f32, (1, 1, d), &Device::Cpu).unwrap(),
        )
        .unwrap();
    let (a, c) = (
        nn::attention_cpu(&q, &k, &v, &mask, 2).unwrap(),
        nn::attention_cpu(&q, &k, &v2, &mask, 2).unwrap(),
    );
    assert_eq!(flat(&a), flat(&c));
    assert!(
        nn::attention_cpu(&q, &k, &v, &mask, 4).is_err(),
        "6 features do not split into 4 heads"
    );
}

#[test]
fn quick_gelu() {
    let x = input(&[3, 7], 2.0, 8.0);
    check(
        "quick_gelu",
        std::slice::from_ref(&x),
        &|t| nn::quick_gelu_cpu(&t[0]),
        &|t| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702)?)?,
        1e-2,
        3e-3,
    );
    check(
        "quick_gelu, composed",
        &[x],
        &|t| nn::quick_gelu_reference(&t[0]),
        &|t| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702)?)?,
        1e-2,
        3e-3,
    );
}

#[test]
fn causal_attention_kernel() {
    // 2 heads of 3, a padded key in the second item; the fused kernel against the composed
    // bias, values and gradients, and finite differences.
    let (b, l, d) = (2, 5, 6);
    let mask = Tensor::new(&[[0f32, 0., 0., 0., 0.], [0., 0., 0., 0., -1e9]], &Device::Cpu).unwrap();
    let (q, k, v) = (
        input(&[b, l, d], 1.0, 2.0),
        input(&[b, l, d], 4.0, 2.0),
        input(&[b, l, d], 6.0, 2.0),
    );
    let m = mask.clone();
    check(
        "causal attention",
        &[q.clone(), k.clone(), v.clone()],
        &|t| nn::attention_causal_cpu(&t[0], &t[1], &t[2], &m, 2),
        &|t| nn::attention_causal_reference(&t[0], &t[1], &t[2], &m, 2),
        1e-2,
        3e-3,
    );
    // The first token sees only itself: its output is its own value.
    let out = nn::attention_causal_cpu(&q, &k, &v, &mask, 2).unwrap();
    let first = flat(&out.narrow(1, 0, 1).unwrap());
    let v0 = flat(&v.narrow(1, 0, 1).unwrap());
    assert!(first.iter().zip(&v0).all(|(a, b)| (a - b).abs() < 1e-6));
}

/// A causal mask (1, 1, L, L) plus a padded key in the second item, as the CLIP text tower.
fn causal_bias(b: usize, l: usize) -> Tensor {
    let mut v = vec![0f32; b * l * l];
    for i in 0..b {
        for q in 0..l {
            for k in 0..l {
                if k > q || (i == 1 && k == l - 1) {
                    v[(i * l + q) * l + k] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, l, l), &Device::Cpu).unwrap()
}

#[test]
fn attention_with_a_full_bias() {
    let (b, l, d) = (2, 4, 6);
    let (q, k, v) = (
        input(&[b, l, d], 1.0, 2.0),
        input(&[b, l, d], 4.0, 2.0),
        input(&[b, l, d], 6.0, 2.0),
    );
    // A bias of zeros is plain attention.
    let zeros = Tensor::zeros((b, l), candle_core::DType::F32, &Device::Cpu).unwrap();
    let z4 = Tensor::zeros((1, 1, l, l), candle_core::DType::F32, &Device::Cpu).unwrap();
    check(
        "attention, zero bias",
        &[q.clone(), k.clone(), v.clone()],
        &|t| nn::attention_with_bias(&t[0], &t[1], &t[2], &z4, 2),
        &|t| nn::attention_reference(&t[0], &t[1], &t[2], &zeros, 2, |w| Ok(w.clone())),
        1e-2,
        3e-3,
    );
    // Causal: gradients against finite differences.
    let bias = causal_bias(b, l);
    check(
        "attention, causal",
        &[q.clone(), k.clone(), v.clone()],
        &|t| nn::attention_with_bias(&t[0], &t[1], &t[2], &bias, 2),
        &|t| nn::attention_with_bias(&t[0], &t[1], &t[2], &bias, 2),
        1e-2,
        3e-3,
    );
    // A token sees no later one: changing the last value changes only the last row.
    let v2 = v
        .slice_assign(
            &[0..b, l - 1..l, 0..d],
            &Tensor::full(9f32, (b, 1, d), &Device::Cpu).unwrap(),
        )
        .unwrap();
    let (a, c) = (
        nn::attention_with_bias(&q, &k, &v, &bias, 2).unwrap(),
        nn::attention_with_bias(&q, &k, &v2, &bias, 2).unwrap(),
    );
    assert_eq!(
        flat(&a.narrow(1, 0, l - 1).unwrap()),
        flat(&c.narrow(1, 0, l - 1).unwrap())
    );
    assert_ne!(
        flat(&a.narrow(1, l - 1, 1).unwrap().narrow(0, 0, 1).unwrap()),
        flat(&c.narrow(1, l - 1, 1).unwrap().narrow(0, 0, 1).unwrap())
    );
}

#[test]
fn average_pool_of_the_modified_resnet() {
    // candle's avg_pool2d (kernel = stride = 2) against a reshape-and-mean, with its backward.
    let x = input(&[2, 3, 4, 6], 5.0, 3.0);
    check(
        "avg_pool2d(2)",
        &[x],
        &|t| t[0].avg_pool2d(2),
        &|t| t[0].reshape((2, 3, 2, 2, 3, 2))?.mean(5)?.mean(3),
        1e-2,
        3e-3,
    );
}

/// Values and gradients of `fused` against `composed` only (no finite differences: for inputs too
/// large to perturb one element at a time).
fn check_against_composed(what: &str, inputs: &[Tensor], fused: Op, composed: Op) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&ts).unwrap(), composed(&ts).unwrap());
    let d = max_abs(&(&a - &b).unwrap());
    assert!(d <= 1e-5 * max_abs(&b).max(1.0), "{what}: forward differs by {d}");
    let w = Tensor::from_vec(pseudo(a.elem_count(), 3.0), a.dims(), &Device::Cpu).unwrap();
    let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (ga, gb) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
        let d = max_abs(&(ga - gb).unwrap());
        assert!(
            d <= 1e-5 * max_abs(gb).max(1.0),
            "{what}: gradient of input {i} differs by {d}"
        );
    }
}

#[test]
fn attention_at_model_sizes() {
    // Heads of 64 over 50 and 77 tokens, as ViT-B/32 and the CLIP text tower run them: the sizes
    // where the per-head GEMMs and the vectorised softmax take their wide paths (the tests above
    // use heads of 3).
    let (b, d, heads) = (2, 128, 2);
    for (l, causal) in [(50, false), (77, true)] {
        let mut mask = vec![0f32; b * l];
        mask[2 * l - 3..].fill(-1e9);
        let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu).unwrap();
        let qkv = [
            input(&[b, l, d], 1.0, 2.0),
            input(&[b, l, d], 4.0, 2.0),
            input(&[b, l, d], 6.0, 2.0),
        ];
        let m = &mask;
        if causal {
            check_against_composed(
                "causal attention, 77 tokens",
                &qkv,
                &|t| nn::attention_causal_cpu(&t[0], &t[1], &t[2], m, heads),
                &|t| nn::attention_causal_reference(&t[0], &t[1], &t[2], m, heads),
            );
        } else {
            check_against_composed(
                "attention, 50 tokens",
                &qkv,
                &|t| nn::attention_cpu(&t[0], &t[1], &t[2], m, heads),
                &|t| nn::attention_reference(&t[0], &t[1], &t[2], m, heads, |w| Ok(w.clone())),
            );
        }
    }
}

#[test]
fn layer_norm_and_quick_gelu_at_model_sizes() {
    // Rows of 768 and a tensor longer than one vector chunk: the vectorised paths.
    let x = input(&[3, 50, 768], 2.0, 3.0);
    let (w, bias) = (input(&[768], 5.0, 1.0), input(&[768], 7.0, 1.0));
    check_against_composed(
        "layer norm, 768 features",
        &[x.clone(), w, bias],
        &|t| nn::layer_norm_cpu(&t[0], &t[1], &t[2], 1e-5),
        &|t| nn::layer_norm_reference(&t[0], &t[1], &t[2], 1e-5),
    );
    check_against_composed(
        "quick_gelu, 115,200 values",
        &[x],
        &|t| nn::quick_gelu_cpu(&t[0]),
        &|t| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702)?)?,
    );
}
