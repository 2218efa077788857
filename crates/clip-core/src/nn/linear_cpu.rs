//! `nn.Linear` on the CPU as one op each way: y = x·Wᵀ + b.
//!
//! Composed, a linear layer is a transpose, a matmul and a broadcast add: three graph nodes, each
//! of which candle's backward pass gives a zero-filled gradient buffer and a sum, and the bias
//! gradient a strided reduction. Here the forward writes the bias into y and lets the GEMM add
//! x·Wᵀ to it; the backward is two GEMMs (dx = dy·W, dW = dyᵀ·x) and a column sum for db.
//!
//! Layout: x (N, in), W (out, in), b (out), y (N, out), all contiguous f32.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_cpu::{as_uninit, assume_init, matmul, parallel, uninit};
use super::dispatch::host_f32;

/// (N, in, out) of x (N, in) and W (out, in), or Wᵀ (in, out) when `transposed`.
fn dims(x: &Layout, w: &Layout, transposed: bool) -> Result<(usize, usize, usize)> {
    let (&[n, d_in], &[a, b]) = (x.dims(), w.dims()) else {
        candle_core::bail!(
            "linear expects x (N, in) and W (out, in), got {:?} and {:?}",
            x.dims(),
            w.dims()
        )
    };
    let (d_out, w_in) = if transposed { (b, a) } else { (a, b) };
    if d_in != w_in {
        candle_core::bail!("linear: input of {d_in} features, weight of {w_in}")
    }
    Ok((n, d_in, d_out))
}

/// Weights of at least this many values are transposed before the forward GEMM (when they do
/// not widen). Measured with the `gemm` crate on 2 threads, N = 256 rows: 768→768 1.29 → 0.16 +
/// 0.86 ms, 3072→768 5.56 → 1.13 + 3.55 ms, 512→128 0.13 → 0.08 ms; widening ones (768→3072)
/// and small ones (128→128) got slower.
const TRANSPOSE_FROM: usize = 1 << 16;

/// Wᵀ (cols, rows) of W (rows, cols), row-major, in tiles of 8 source columns per write stream
/// (16 rows of a 3072-wide matrix map to one L1 set and evict each other), parallel over them.
pub(super) fn transpose(rows: usize, cols: usize, w: &[f32]) -> Vec<f32> {
    const T: usize = 8;
    let mut out = uninit(rows * cols);
    out.par_chunks_mut(T * rows).enumerate().for_each(|(tile, dst)| {
        let c0 = tile * T;
        let cw = dst.len() / rows;
        for r in 0..rows {
            for (cc, &v) in w[r * cols + c0..][..cw].iter().enumerate() {
                dst[cc * rows + r].write(v);
            }
        }
    });
    // SAFETY: every (column, row) position was written once.
    unsafe { assume_init(out) }
}

/// y = x·Wᵀ + b. With `transposed` the weight operand is Wᵀ (in, out) already, prepared once for
/// a whole `no_grad` scope (see `nn::pool`); with `packed` (bf16, inside `no_grad` too) the GEMM
/// reads that packed copy of W instead of the operand. Neither form has a backward pass.
pub struct LinearOp {
    pub transposed: bool,
    pub packed: Option<std::sync::Arc<super::bf16::PackedB>>,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "clipmine-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d_in, d_out) = dims(l1, l2, self.transposed)?;
        let (x, w, b) = (
            host_f32("linear", s1, l1)?,
            host_f32("linear", s2, l2)?,
            host_f32("linear", s3, l3)?,
        );
        if b.len() != d_out {
            candle_core::bail!("linear: bias of {} for {d_out} outputs", b.len())
        }
        let mut y = Vec::with_capacity(n * d_out);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        // y (N, out) += x (N, in) · Wᵀ (in, out). Read in place, Wᵀ is column-major, which the
        // GEMM packs through its slow generic path (21 % of DistilBERT's inference in `perf`).
        // Where the weight is square or narrowing, transposing it first costs less than that.
        let y_out = as_uninit(&mut y);
        if let Some(p) = &self.packed {
            if p.shape() != (d_in, d_out) {
                candle_core::bail!("linear: a packed weight of {:?} for {d_in} → {d_out}", p.shape())
            }
            // SAFETY: x is (N, in) row-major, y (N, out) holds the bias (accumulated into); the
            // packed weight is Wᵀ (in, out), checked above, packed where AMX is usable.
            unsafe {
                super::bf16::gemm_bf16_packed(
                    n,
                    y_out.as_mut_ptr().cast::<f32>(),
                    d_out,
                    true,
                    1.0,
                    super::bf16::MatRef::new(x.as_ptr(), d_in, 1),
                    p,
                    true,
                )
            };
        } else if self.transposed {
            matmul(n, d_out, d_in, y_out, true, x, d_in, 1, w, d_out, 1, parallel());
        } else if d_in >= d_out && d_in * d_out >= TRANSPOSE_FROM && !super::precision::bf16_gemms() {
            // (The bf16 GEMM packs W read in place: no transposed copy.)
            let wt = transpose(d_out, d_in, w);
            matmul(n, d_out, d_in, y_out, true, x, d_in, 1, &wt, d_out, 1, parallel());
        } else {
            matmul(n, d_out, d_in, y_out, true, x, d_in, 1, w, 1, d_in, parallel());
        }
        Ok((CpuStorage::F32(y), Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.transposed || self.packed.is_some() {
            candle_core::bail!("linear: no backward through a weight prepared for inference (no_grad)")
        }
        let (n, d_in) = x.dims2()?;
        let d_out = w.dim(0)?;
        let packed = x.apply_op3_no_bwd(
            w,
            &gy.contiguous()?,
            &LinearGrad {
                input_grad: x.track_op(),
            },
        )?;
        let (mut at, mut gx) = (0, None);
        if x.track_op() {
            gx = Some(packed.narrow(0, 0, n * d_in)?.reshape((n, d_in))?);
            at = n * d_in;
        }
        let gw = packed.narrow(0, at, d_out * d_in)?.reshape((d_out, d_in))?;
        let gb = packed.narrow(0, at + d_out * d_in, d_out)?;
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// [dx (when `input_grad`), dW, db] packed in one vector.
struct LinearGrad {
    input_grad: bool,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "clipmine-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d_in, d_out) = dims(l1, l2, false)?;
        let (x, w, gy) = (
            host_f32("linear", s1, l1)?,
            host_f32("linear", s2, l2)?,
            host_f32("linear", s3, l3)?,
        );
        if l3.dims() != [n, d_out] {
            candle_core::bail!(
                "linear backward: gradient {:?} does not match output {:?}",
                l3.dims(),
                (n, d_out)
            )
        }
        let nx = if self.input_grad { n * d_in } else { 0 };
        let mut out = uninit(nx + d_out * d_in + d_out);
        let (gx, rest) = out.split_at_mut(nx);
        let (gw, gb) = rest.split_at_mut(d_out * d_in);
        if self.input_grad {
            // dx (N, in) = dy (N, out) · W (out, in)
            matmul(n, d_in, d_out, gx, false, gy, d_out, 1, w, d_in, 1, parallel());
        }
        // dW (out, in) = dyᵀ (out, N) · x (N, in)
        matmul(d_out, d_in, n, gw, false, gy, 1, d_out, x, d_in, 1, parallel());
        // db = Σ over rows of dy, a column block per work item.
        gb.par_chunks_mut(64).enumerate().for_each(|(ci, cols)| {
            let c0 = ci * 64;
            let mut acc = [0f32; 64];
            for row in gy.chunks_exact(d_out) {
                for (a, &g) in acc.iter_mut().zip(&row[c0..c0 + cols.len()]) {
                    *a += g;
                }
            }
            for (o, &a) in cols.iter_mut().zip(&acc) {
                o.write(a);
            }
        });
        // SAFETY: the GEMMs wrote dx and dW in full, and the column sums all of db.
        let out = unsafe { assume_init(out) };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
