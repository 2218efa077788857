//! clipmine's layers written as ONNX nodes, each computing what its candle module computes
//! (`crate::nn`'s Linear, LayerNorm, activations and attention; `crate::model`'s blocks and
//! heads), over the same parameter names.

use anyhow::Result;

use super::graph::{Attr, Graph};
use crate::config::{Activation, HeadKind};
use crate::model::BertScheme;

/// `x W^T + b` for the parameters `{prefix}.weight` (out, in) and, if `bias`, `{prefix}.bias`.
pub fn linear(g: &mut Graph, x: &str, prefix: &str, bias: bool) -> Result<String> {
    let w = g.weight_t(&format!("{prefix}.weight"))?;
    let y = g.op("MatMul", &[x, &w], vec![]);
    if !bias {
        return Ok(y);
    }
    let b = g.weight(&format!("{prefix}.bias"), None)?;
    Ok(g.op("Add", &[&y, &b], vec![]))
}

/// LayerNorm over the last axis with `{prefix}.weight` and `{prefix}.bias`.
pub fn layer_norm(g: &mut Graph, x: &str, prefix: &str, eps: f64) -> Result<String> {
    let w = g.weight(&format!("{prefix}.weight"), None)?;
    let b = g.weight(&format!("{prefix}.bias"), None)?;
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![Attr::Int("axis", -1), Attr::Float("epsilon", eps as f32)],
    ))
}

/// The feed-forward activation `a` (as `crate::nn::activation`).
pub fn activation(g: &mut Graph, x: &str, a: Activation) -> String {
    match a {
        Activation::Gelu => gelu(g, x),
        Activation::GeluNew => gelu_tanh(g, x),
        Activation::Relu => g.op("Relu", &[x], vec![]),
        Activation::QuickGelu => {
            // x·σ(1.702x)
            let k = g.constant("quick_gelu_k", &[], &[1.702]);
            let kx = g.op("Mul", &[x, &k], vec![]);
            let s = g.op("Sigmoid", &[&kx], vec![]);
            g.op("Mul", &[x, &s], vec![])
        }
    }
}

/// Exact GELU: x·(1 + erf(x/√2))/2.
pub fn gelu(g: &mut Graph, x: &str) -> String {
    let r = g.constant("inv_sqrt2", &[], &[std::f32::consts::FRAC_1_SQRT_2]);
    let (one, half) = (g.constant("one", &[], &[1.0]), g.constant("half", &[], &[0.5]));
    let e = g.op("Mul", &[x, &r], vec![]);
    let e = g.op("Erf", &[&e], vec![]);
    let e = g.op("Add", &[&e, &one], vec![]);
    let e = g.op("Mul", &[x, &e], vec![]);
    g.op("Mul", &[&e, &half], vec![])
}

/// GELU's tanh approximation (candle's `gelu`, Hugging Face's `gelu_new`):
/// x·(1 + tanh(√(2/π)·(x + 0.044715x³)))/2.
fn gelu_tanh(g: &mut Graph, x: &str) -> String {
    let c = g.constant("gelu_c", &[], &[0.044715]);
    let s = g.constant("sqrt_2_over_pi", &[], &[(2.0f32 / std::f32::consts::PI).sqrt()]);
    let (one, half) = (g.constant("one", &[], &[1.0]), g.constant("half", &[], &[0.5]));
    let x2 = g.op("Mul", &[x, x], vec![]);
    let x3 = g.op("Mul", &[&x2, x], vec![]);
    let t = g.op("Mul", &[&x3, &c], vec![]);
    let t = g.op("Add", &[x, &t], vec![]);
    let t = g.op("Mul", &[&t, &s], vec![]);
    let t = g.op("Tanh", &[&t], vec![]);
    let t = g.op("Add", &[&t, &one], vec![]);
    let t = g.op("Mul", &[x, &t], vec![]);
    g.op("Mul", &[&t, &half], vec![])
}

/// Multi-head attention of `q` over `k`, `v` (B, L, W) in `heads` heads, scores scaled by 1/√Dh
/// plus `bias` (broadcastable to (B, H, L, L)) when given; the context (B, L, W).
pub fn attention(g: &mut Graph, q: &str, k: &str, v: &str, bias: Option<&str>, heads: usize, width: usize) -> String {
    let dh = width / heads.max(1);
    let split = g.ints("heads_shape", &[0, 0, heads as i64, dh as i64]);
    let merge = g.ints("merge_shape", &[0, 0, width as i64]);
    let heads_of = |g: &mut Graph, t: &str, perm: Vec<i64>| {
        let t = g.op("Reshape", &[t, &split], vec![]);
        g.op("Transpose", &[&t], vec![Attr::Ints("perm", perm)])
    };
    let q = heads_of(g, q, vec![0, 2, 1, 3]); // (B, H, L, Dh)
    let k = heads_of(g, k, vec![0, 2, 3, 1]); // (B, H, Dh, L)
    let v = heads_of(g, v, vec![0, 2, 1, 3]);
    let scale = g.constant("attn_scale", &[], &[1.0 / (dh as f32).sqrt()]);
    let q = g.op("Mul", &[&q, &scale], vec![]);
    let mut scores = g.op("MatMul", &[&q, &k], vec![]);
    if let Some(b) = bias {
        scores = g.op("Add", &[&scores, b], vec![]);
    }
    let w = g.op("Softmax", &[&scores], vec![Attr::Int("axis", -1)]);
    let ctx = g.op("MatMul", &[&w, &v], vec![]);
    let ctx = g.op("Transpose", &[&ctx], vec![Attr::Ints("perm", vec![0, 2, 1, 3])]);
    g.op("Reshape", &[&ctx, &merge], vec![])
}

/// The sizes of a transformer block.
#[derive(Clone, Copy)]
pub struct BlockShape {
    pub width: usize,
    pub heads: usize,
    pub activation: Activation,
    pub eps: f64,
}

/// CLIP's pre-LN block (`crate::model::ResidualAttentionBlock`) under `prefix`:
/// `x + out(attn(ln1 x))`, then `x + fc2(act(fc1(ln2 x)))`.
pub fn clip_block(g: &mut Graph, x: &str, prefix: &str, s: BlockShape, bias: Option<&str>) -> Result<String> {
    let p = |n: &str| format!("{prefix}.{n}");
    let h = layer_norm(g, x, &p("layer_norm1"), s.eps)?;
    let q = linear(g, &h, &p("self_attn.q_proj"), true)?;
    let k = linear(g, &h, &p("self_attn.k_proj"), true)?;
    let v = linear(g, &h, &p("self_attn.v_proj"), true)?;
    let ctx = attention(g, &q, &k, &v, bias, s.heads, s.width);
    let o = linear(g, &ctx, &p("self_attn.out_proj"), true)?;
    let x = g.op("Add", &[x, &o], vec![]);
    let h = layer_norm(g, &x, &p("layer_norm2"), s.eps)?;
    let h = linear(g, &h, &p("mlp.fc1"), true)?;
    let h = activation(g, &h, s.activation);
    let h = linear(g, &h, &p("mlp.fc2"), true)?;
    Ok(g.op("Add", &[&x, &h], vec![]))
}

/// A post-LN BERT / DistilBERT layer (`crate::model::TextEncoder`'s) under `prefix`:
/// `x = ln(x + out(attn(x)))`, then `ln(x + ffn_out(act(ffn_in(x))))`.
/// The weights' names are the candle module's own (`crate::model::BertScheme`).
pub fn bert_block(g: &mut Graph, x: &str, prefix: &str, n: &BertScheme, s: BlockShape, bias: &str) -> Result<String> {
    let p = |name: &str| format!("{prefix}.{name}");
    let q = linear(g, x, &p(n.query), true)?;
    let k = linear(g, x, &p(n.key), true)?;
    let v = linear(g, x, &p(n.value), true)?;
    let ctx = attention(g, &q, &k, &v, Some(bias), s.heads, s.width);
    let o = linear(g, &ctx, &p(n.attention_out), true)?;
    let x = g.op("Add", &[&o, x], vec![]);
    let x = layer_norm(g, &x, &p(n.attention_norm), s.eps)?;
    let h = linear(g, &x, &p(n.ffn_in), true)?;
    let h = activation(g, &h, s.activation);
    let h = linear(g, &h, &p(n.ffn_out), true)?;
    let x2 = g.op("Add", &[&h, &x], vec![]);
    layer_norm(g, &x2, &p(n.output_norm), s.eps)
}

/// A head (`crate::model::Head`) under `prefix`: CLIP's bias-free projection, or the tutorial's
/// Linear → GELU → Linear → + residual → LayerNorm (its dropout is off at inference).
pub fn head(g: &mut Graph, x: &str, prefix: &str, kind: HeadKind) -> Result<String> {
    match kind {
        HeadKind::Linear => linear(g, x, prefix, false),
        HeadKind::Mlp => {
            let projected = linear(g, x, &format!("{prefix}.projection"), true)?;
            let h = gelu(g, &projected);
            let h = linear(g, &h, &format!("{prefix}.fc"), true)?;
            let h = g.op("Add", &[&h, &projected], vec![]);
            layer_norm(g, &h, &format!("{prefix}.layer_norm"), 1e-5)
        }
    }
}

/// Each row scaled to unit length as `crate::nn::normalize::l2_normalize`: x / √(Σx² + 1e-12).
pub fn l2_normalize(g: &mut Graph, x: &str) -> String {
    let axes = g.ints("last_axis", &[-1]);
    let eps = g.constant("l2_eps", &[], &[1e-12]);
    let sq = g.op("Mul", &[x, x], vec![]);
    let sum = g.op("ReduceSum", &[&sq, &axes], vec![Attr::Int("keepdims", 1)]);
    let sum = g.op("Add", &[&sum, &eps], vec![]);
    let norm = g.op("Sqrt", &[&sum], vec![]);
    g.op("Div", &[x, &norm], vec![])
}
