//! The vendored candle-core's backward (vendor/README.md) stores a node's first gradient as it is
//! and adds only later ones: gradients with fan-in, subtraction and shared storage must still sum
//! exactly as the chain rule says.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gradients_sum_over_every_use_of_a_tensor() {
    let dev = Device::Cpu;
    let x = Var::new(&[1.0f32, -2.0, 3.0], &dev).unwrap();
    let a = Tensor::new(&[0.5f32, 2.0, -1.0], &dev).unwrap();
    // x used four times: as both sides of an add, under a product, and subtracted.
    let xt = x.as_tensor();
    let y = ((xt + xt).unwrap() + (xt * &a).unwrap()).unwrap();
    let y = (y - (xt * 3.0).unwrap()).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let gx = values(g.get(xt).unwrap());
    // y = x·(2 + a − 3) = x·(a − 1); d(y²)/dx = 2·x·(a − 1)².
    let (xv, av) = (values(xt), values(&a));
    for i in 0..3 {
        let expected = 2.0 * xv[i] * (av[i] - 1.0).powi(2);
        assert!((gx[i] - expected).abs() < 1e-5, "x[{i}]: {} vs {expected}", gx[i]);
    }
}

#[test]
fn two_variables_fed_the_same_gradient_keep_their_own() {
    let dev = Device::Cpu;
    let (p, q) = (
        Var::new(&[1.0f32, 2.0], &dev).unwrap(),
        Var::new(&[3.0f32, 4.0], &dev).unwrap(),
    );
    // An add hands one gradient tensor to both sides; q's is then summed with a second use.
    let s = (p.as_tensor() + q.as_tensor()).unwrap();
    let loss = ((&s * 2.0).unwrap() + (q.as_tensor() * 5.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    assert_eq!(values(g.get(p.as_tensor()).unwrap()), vec![2.0, 2.0]);
    assert_eq!(values(g.get(q.as_tensor()).unwrap()), vec![7.0, 7.0]);
    // A transposed (non-contiguous) first gradient is stored contiguous.
    let m = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let w = Tensor::new(&[[1.0f32, 0.0], [0.0, 2.0], [1.0, 1.0]], &dev).unwrap();
    let loss = m.as_tensor().t().unwrap().mul(&w).unwrap().sum_all().unwrap();
    let gm = g_of(&loss, &m);
    assert!(gm.is_contiguous());
    assert_eq!(values(&gm), vec![1.0, 0.0, 1.0, 0.0, 2.0, 1.0]);
}

fn g_of(loss: &Tensor, v: &Var) -> Tensor {
    loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
}
