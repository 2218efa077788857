//! `--quantize int8`: the graphs rewritten as ONNX Runtime's own dynamic quantizer
//! (`onnxruntime.quantization.quantize_dynamic`, per-channel) rewrites them, so that ONNX Runtime
//! runs the integer kernels it fuses and accelerates (VNNI / AMX-INT8 on x86, dot-product on Arm):
//!
//! - every MatMul whose right operand is a weight (W: K×N) becomes
//!   `DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp) → Cast → Mul(x_scale · w_scale)`;
//! - every Conv whose kernel is a weight (M×C×kh×kw) keeps it as int8 with one scale per output
//!   channel, dequantized (`DequantizeLinear`) and run in fp32. ONNX Runtime folds those
//!   constants into fp32 kernels as the session loads when `clip.json`'s `session_config` says so
//!   (`session.disable_quant_qdq`; without it, it dequantizes at every run: the simple-clip
//!   ResNet-50 ran at 17 images/s against fp32's 33). Not `ConvInteger` as `quantize_dynamic`
//!   writes: ONNX Runtime 1.32's ran that ResNet-50 at 5.6 images/s (its docs advise static
//!   quantization for CNNs); the file is as small either way;
//! - every embedding table (a Gather of rows of a weight) is stored as int8 rows with one scale
//!   per row, gathered with it and rescaled (a DistilBERT's 30,522 × 768 table is most of its
//!   text encoder's bytes);
//! - weights are int8, symmetric (no zero point), one scale per output channel
//!   (`max |w| / 127` over the channel);
//! - activations are uint8 with a scale and zero point measured on each input as it arrives
//!   (`DynamicQuantizeLinear`), once per tensor however many weights read it (q, k and v share
//!   theirs).
//!
//! Everything else stays fp32: LayerNorm, softmax, attention's scores and context (two
//! activations: nothing to calibrate), BatchNorm, the L2 normalisation. The cost in
//! accuracy and the speed are measured in the README ("Ship it: ONNX").
//!
//! A note from ONNX Runtime's documentation: on x86 CPUs without VNNI its u8·s8 kernels use
//! `VPMADDUBSW`, which can saturate where two adjacent products are both near their maximum.

use std::collections::HashMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, NodeProto, TensorProto,
};

/// How an export's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// int8 weights per output channel, uint8 activations quantized as they arrive.
    Int8,
}

impl std::str::FromStr for Quantize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int8" => Ok(Self::Int8),
            other => bail!(
                "unknown quantization {other:?}: int8 (weights int8 per output channel, activations uint8 dynamic)"
            ),
        }
    }
}

/// What [`int8`] rewrote in one graph (written into `clip.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Quantized {
    pub matmuls: usize,
    /// Convs whose kernels are stored int8 (they compute in fp32).
    pub convs: usize,
    pub embeddings: usize,
    /// Weights made int8: their fp32 bytes, and their int8 bytes with the scales.
    pub fp32_bytes: usize,
    pub int8_bytes: usize,
}

/// The largest magnitude of an int8 weight: symmetric, so that zero is exact and no zero point is
/// needed.
const QMAX: f32 = 127.0;

/// Rewrites `graph`'s weight MatMuls, Convs and embedding tables as the module's doc says. A
/// weight is quantized once however many nodes read it; its fp32 form is dropped where nothing
/// else reads it.
pub fn int8(graph: &mut GraphProto) -> Result<Quantized> {
    let floats: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .filter(|(_, t)| t.data_type == Some(DataType::Float as i32) && t.raw_data.is_some())
        .map(|(i, t)| (t.name().to_string(), i))
        .collect();
    let mut w = Rewrite {
        graph_inits: &graph.initializer,
        floats: &floats,
        nodes: Vec::with_capacity(graph.node.len()),
        inits: vec![],
        dynamic: HashMap::new(),
        replaced: HashMap::new(),
        done: Quantized::default(),
    };
    for node in std::mem::take(&mut graph.node) {
        let weight = node.input.get(1).and_then(|n| w.float(n));
        let table = node.input.first().and_then(|n| w.float(n));
        let axis = node.attribute.iter().find(|a| a.name() == "axis").map_or(0, |a| a.i());
        match (node.op_type(), weight) {
            ("Gather", _) if table.is_some_and(|t| t.dims.len() == 2) && axis == 0 => w.gather(node),
            ("MatMul", Some(t)) if t.dims.len() == 2 => w.matmul(node),
            ("Conv", Some(t)) if t.dims.len() == 4 => w.conv(node),
            _ => w.nodes.push(node),
        }
    }
    let Rewrite {
        nodes,
        inits,
        replaced,
        done,
        ..
    } = w;
    graph.node = nodes;
    let read: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let unread: std::collections::HashSet<String> = replaced
        .into_keys()
        .map(|(name, _)| name)
        .filter(|k| !read.contains(k.as_str()))
        .collect();
    graph.initializer.retain(|t| !unread.contains(t.name()));
    graph.initializer.extend(inits);
    Ok(done)
}

/// The rewrite in progress.
struct Rewrite<'a> {
    graph_inits: &'a [TensorProto],
    floats: &'a HashMap<String, usize>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Activations already quantized: name → (x_q, x_scale, x_zero_point).
    dynamic: HashMap<String, [String; 3]>,
    /// fp32 weights that now have an int8 form (by name and channel axis), and its (values,
    /// scales) names.
    replaced: HashMap<(String, usize), (String, String)>,
    done: Quantized,
}

impl Rewrite<'_> {
    fn float(&self, name: &str) -> Option<&TensorProto> {
        self.floats.get(name).map(|&i| &self.graph_inits[i])
    }

    fn values(&self, name: &str) -> (Vec<i64>, Vec<f32>) {
        let t = self.float(name).expect("a float initializer");
        let raw = t.raw_data.as_deref().unwrap_or_default();
        let v = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.dims.clone(), v)
    }

    fn push(&mut self, op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(format!("{op}_{output}")),
            op_type: Some(op.into()),
            attribute,
            ..Default::default()
        });
    }

    /// `x` as uint8 with its scale and zero point, quantized once.
    fn dynamic(&mut self, x: &str) -> [String; 3] {
        if let Some(q) = self.dynamic.get(x) {
            return q.clone();
        }
        let q = [format!("{x}_quant"), format!("{x}_scale"), format!("{x}_zero_point")];
        self.nodes.push(NodeProto {
            input: vec![x.to_string()],
            output: q.to_vec(),
            name: Some(format!("DynamicQuantizeLinear_{x}")),
            op_type: Some("DynamicQuantizeLinear".into()),
            ..Default::default()
        });
        self.dynamic.insert(x.to_string(), q.clone());
        q
    }

    /// The weight `name` as int8 along output channels `axis` (its shape kept) and the channels'
    /// scales, shaped `scale_dims`; returns their initializer names.
    fn weight(&mut self, name: &str, axis: usize, scale_dims: Vec<i64>) -> (String, String) {
        let key = (name.to_string(), axis);
        if let Some(q) = self.replaced.get(&key) {
            return q.clone();
        }
        let (dims, v) = self.values(name);
        let (q, scales) = per_channel(&v, &dims, axis);
        self.done.fp32_bytes += v.len() * 4;
        self.done.int8_bytes += q.len() + scales.len() * 4;
        // Read along another axis elsewhere (never, with this writer's fresh names): its own names.
        let tag = if self.replaced.keys().any(|(n, _)| n == name) {
            format!("_axis{axis}")
        } else {
            String::new()
        };
        let (qn, sn) = (format!("{name}{tag}_int8"), format!("{name}{tag}_scale"));
        self.inits.push(TensorProto {
            name: Some(qn.clone()),
            dims,
            data_type: Some(DataType::Int8 as i32),
            raw_data: Some(q.iter().map(|&b| b as u8).collect()),
            ..Default::default()
        });
        self.inits.push(f32_tensor(&sn, scale_dims, &scales));
        self.replaced.insert(key, (qn.clone(), sn.clone()));
        (qn, sn)
    }

    /// `int32 → float → · x_scale · w_scale` into `out`.
    fn rescale(&mut self, int: &str, x_scale: &str, w_scale: &str, out: &str) {
        let (f, s) = (format!("{out}_float"), format!("{out}_rescale"));
        self.push("Cast", &[int], &f, vec![to_float()]);
        self.push("Mul", &[x_scale, w_scale], &s, vec![]);
        self.push("Mul", &[&f, &s], out, vec![]);
    }

    fn matmul(&mut self, node: NodeProto) {
        let (x, w, y) = (&node.input[0], &node.input[1], &node.output[0]);
        let n = self.float(w).map_or(0, |t| t.dims[1]);
        let [xq, xs, xz] = self.dynamic(x);
        let (wq, ws) = self.weight(w, 1, vec![n]);
        let int = format!("{y}_int32");
        self.push("MatMulInteger", &[&xq, &wq, &xz], &int, vec![]);
        self.rescale(&int, &xs, &ws, y);
        self.done.matmuls += 1;
    }

    fn gather(&mut self, node: NodeProto) {
        let (table, ids, y) = (&node.input[0], &node.input[1], &node.output[0]);
        let rows = self.float(table).map_or(0, |t| t.dims[0]);
        let (tq, ts) = self.weight(table, 0, vec![rows, 1]);
        let (q, f, s) = (format!("{y}_int8"), format!("{y}_float"), format!("{y}_rescale"));
        self.push("Gather", &[&tq, ids], &q, node.attribute.clone());
        self.push("Cast", &[&q], &f, vec![to_float()]);
        self.push("Gather", &[&ts, ids], &s, node.attribute.clone());
        self.push("Mul", &[&f, &s], y, vec![]);
        self.done.embeddings += 1;
    }

    /// A Conv keeps fp32 activations: its kernel is stored int8 and dequantized as the session
    /// loads (see the module's doc for why not ConvInteger).
    fn conv(&mut self, mut node: NodeProto) {
        let (w, y) = (node.input[1].clone(), node.output[0].clone());
        let m = self.float(&w).map_or(0, |t| t.dims[0]);
        let (wq, ws) = self.weight(&w, 0, vec![m]);
        let kernel = format!("{y}_kernel");
        self.push("DequantizeLinear", &[&wq, &ws], &kernel, vec![int_attr("axis", 0)]);
        node.input[1] = kernel;
        self.nodes.push(node);
        self.done.convs += 1;
    }
}

/// An integer attribute.
fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// Cast's `to = FLOAT`.
fn to_float() -> AttributeProto {
    int_attr("to", DataType::Float as i64)
}

fn f32_tensor(name: &str, dims: Vec<i64>, v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims,
        data_type: Some(DataType::Float as i32),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// Symmetric int8 values of `v` (shape `dims`, row-major) with one scale per index along `axis`:
/// `max |w| / 127` over that channel (1 where the channel is all zeros).
pub fn per_channel(v: &[f32], dims: &[i64], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let channel = |i: usize| (i / inner.max(1)) % channels.max(1);
    let mut max = vec![0f32; channels];
    for (i, x) in v.iter().enumerate() {
        let c = channel(i);
        max[c] = max[c].max(x.abs());
    }
    let scales: Vec<f32> = max.iter().map(|&m| if m > 0.0 { m / QMAX } else { 1.0 }).collect();
    let q = v
        .iter()
        .enumerate()
        .map(|(i, x)| (x / scales[channel(i)]).round().clamp(-QMAX, QMAX) as i8)
        .collect();
    (q, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            op_type: Some(op.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_weight_read_twice_is_quantized_once_and_each_input_once() {
        // y1 = x·W, y2 = x·W, z = y1·V (V read by nothing else), e = Gather(E, ids).
        let mut g = GraphProto {
            node: vec![
                node("MatMul", &["x", "W"], "y1"),
                node("MatMul", &["x", "W"], "y2"),
                node("MatMul", &["y1", "V"], "z"),
                node("Gather", &["E", "ids"], "e"),
            ],
            initializer: vec![
                f32_tensor("W", vec![2, 3], &[1.0, -2.0, 0.5, 0.25, 4.0, -1.0]),
                f32_tensor("V", vec![3, 1], &[1.0, 2.0, 3.0]),
                f32_tensor("E", vec![2, 2], &[0.5, -0.5, 8.0, 2.0]),
            ],
            ..Default::default()
        };
        let done = int8(&mut g).unwrap();
        assert_eq!((done.matmuls, done.convs, done.embeddings), (3, 0, 1));
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["W_int8", "W_scale", "V_int8", "V_scale", "E_int8", "E_scale"]);
        let ops = |op: &str| g.node.iter().filter(|n| n.op_type() == op).count();
        // x quantized once for both of its MatMuls, y1 once for its own.
        assert_eq!(
            (ops("DynamicQuantizeLinear"), ops("MatMulInteger"), ops("MatMul")),
            (2, 3, 0)
        );
        // Each original output is still produced, by the rescale.
        for y in ["y1", "y2", "z", "e"] {
            assert_eq!(
                g.node.iter().filter(|n| n.output.iter().any(|o| o == y)).count(),
                1,
                "{y}"
            );
        }
        // The table: one scale per row (8/127 for the second).
        let dims = |n: &str| g.initializer.iter().find(|t| t.name() == n).unwrap().dims.clone();
        assert_eq!(
            (dims("E_scale"), dims("W_scale"), dims("V_scale")),
            (vec![2, 1], vec![3], vec![1])
        );
    }

    #[test]
    fn per_channel_scales_follow_the_axis_and_round_trip_within_half_a_step() {
        // 2×3, channels along axis 1 (a MatMul's N): columns [1, -4], [0, 0], [2, 0.5].
        let v = [1.0, 0.0, 2.0, -4.0, 0.0, 0.5];
        let (q, s) = per_channel(&v, &[2, 3], 1);
        assert_eq!(s, vec![4.0 / 127.0, 1.0, 2.0 / 127.0]);
        assert_eq!(q, vec![32, 0, 127, -127, 0, 32]);
        // Channels along axis 0 (a Conv's output channels), 2×2×1×1.
        let (q, s) = per_channel(&[0.05, -0.2, 3.0, 1.5], &[2, 2, 1, 1], 0);
        assert_eq!(s, vec![0.2 / 127.0, 3.0 / 127.0]);
        assert_eq!(q, vec![32, -127, 127, 64]);
        let (q, s) = per_channel(&v, &[2, 3], 1);
        for (i, (x, q)) in v.iter().zip(&q).enumerate() {
            let s = s[i % 3];
            assert!((x - *q as f32 * s).abs() <= s / 2.0 + 1e-7, "{x} as {q}·{s}");
        }
    }
}
