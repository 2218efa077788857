//! Our differentiable im2col convolution against candle's native one, values and gradients.

use candle_core::{Device, Tensor, Var};
use clip_core::nn::conv2d_im2col;

fn pseudo(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5)
        .collect()
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
        let x = Var::from_tensor(
            &Tensor::from_vec(pseudo(2 * c * h * w, 1.0), (2, c, h, w), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let kk = Var::from_tensor(
            &Tensor::from_vec(pseudo(o * c * k * k, 7.0), (o, c, k, k), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let ours = conv2d_im2col(x.as_tensor(), kk.as_tensor(), s, p).unwrap();
        let theirs = x.as_tensor().conv2d(kk.as_tensor(), p, s, 1, 1).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let diff = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-4,
            "forward differs by {diff} for {:?}",
            (c, o, h, w, k, s, p)
        );

        let weights =
            Tensor::from_vec(pseudo(ours.elem_count(), 3.0), ours.dims(), &Device::Cpu).unwrap();
        let g1 = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &kk] {
            let a = g1.get(v.as_tensor()).unwrap();
            let b = g2.get(v.as_tensor()).unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d < 1e-4,
                "gradient differs by {d} for {:?}",
                (c, o, h, w, k, s, p)
            );
        }
    }
}
