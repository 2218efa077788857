//! A small ONNX graph builder: nodes with fresh output names, weights taken from the model's
//! parameters by name as fp32 initializers, constants, and the graph's typed inputs and outputs.
//! The towers' writers (`layers`, `towers`) say what to compute; this says how it is spelled.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The operator set the graphs are written for: the first with LayerNormalization.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17 (ONNX 1.12).
const IR_VERSION: i64 = 8;

/// One dimension of a graph input or output: fixed, or named and free (the batch, the caption
/// length).
pub enum Dim {
    Fixed(usize),
    Free(&'static str),
}

/// An ONNX graph being written over a model's parameters (name → tensor).
pub struct Graph<'a> {
    params: &'a HashMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    fresh: usize,
}

/// An attribute of a node.
#[derive(Clone)]
pub enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
    Float(&'static str, f32),
    /// A one-element float tensor (ConstantOfShape's `value`).
    Scalar(&'static str, f32),
}

impl Attr {
    fn proto(self) -> AttributeProto {
        let mut a = AttributeProto::default();
        match self {
            Attr::Int(n, v) => {
                a.name = Some(n.into());
                a.r#type = Some(AttributeType::Int as i32);
                a.i = Some(v);
            }
            Attr::Ints(n, v) => {
                a.name = Some(n.into());
                a.r#type = Some(AttributeType::Ints as i32);
                a.ints = v;
            }
            Attr::Float(n, v) => {
                a.name = Some(n.into());
                a.r#type = Some(AttributeType::Float as i32);
                a.f = Some(v);
            }
            Attr::Scalar(n, v) => {
                a.name = Some(n.into());
                a.r#type = Some(AttributeType::Tensor as i32);
                a.t = Some(tensor_f32("", &[1], &[v]));
            }
        }
        a
    }
}

/// A float32 tensor (little-endian raw data).
fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Free(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl<'a> Graph<'a> {
    pub fn new(params: &'a HashMap<String, Tensor>) -> Self {
        Self {
            params,
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            outputs: vec![],
            fresh: 0,
        }
    }

    /// Declares a graph input (float32 or int64) and returns its name.
    pub fn input(&mut self, name: &str, int64: bool, dims: &[Dim]) -> String {
        let elem = if int64 { DataType::Int64 } else { DataType::Float };
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Names `value` the graph's float32 output `name` (through an Identity node).
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim]) {
        self.node("Identity", &[value], vec![], name.to_string());
        self.outputs.push(value_info(name, DataType::Float, dims));
    }

    fn name(&mut self, hint: &str) -> String {
        self.fresh += 1;
        format!("{hint}_{}", self.fresh)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<Attr>, out: String) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.nodes.len())),
            op_type: Some(op.into()),
            attribute: attrs.into_iter().map(Attr::proto).collect(),
            ..Default::default()
        });
        out
    }

    /// One node of `op` over `inputs`; returns its (single) output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<Attr>) -> String {
        let out = self.name(&op.to_lowercase());
        self.node(op, inputs, attrs, out)
    }

    /// The model's parameter `name` as float32 values and its shape.
    fn values(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .params
            .get(name)
            .with_context(|| format!("the model has no parameter {name} to write into the ONNX graph"))?;
        let t = t.to_dtype(DType::F32)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The parameter `name` as an initializer of its own shape (or `shape`, same element count).
    pub fn weight(&mut self, name: &str, shape: Option<&[usize]>) -> Result<String> {
        let (dims, data) = self.values(name)?;
        let dims = match shape {
            Some(s) if s.iter().product::<usize>() != data.len() => {
                bail!("parameter {name} of shape {dims:?} cannot be read as {s:?}")
            }
            Some(s) => s.to_vec(),
            None => dims,
        };
        Ok(self.constant(name, &dims, &data))
    }

    /// The 2-D parameter `name` (out, in), transposed to (in, out) for a MatMul.
    pub fn weight_t(&mut self, name: &str) -> Result<String> {
        let (dims, data) = self.values(name)?;
        let [o, i] = dims[..] else {
            bail!("parameter {name} has shape {dims:?}, not a matrix")
        };
        let t: Vec<f32> = (0..i)
            .flat_map(|c| (0..o).map(move |r| (r, c)))
            .map(|(r, c)| data[r * i + c])
            .collect();
        Ok(self.constant(&format!("{name}.T"), &[i, o], &t))
    }

    /// A float32 initializer.
    pub fn constant(&mut self, hint: &str, dims: &[usize], data: &[f32]) -> String {
        let name = self.name(hint);
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(tensor_f32(&name, &dims, data));
        name
    }

    /// An int64 initializer (shapes, axes, indices).
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        self.ints_shaped(hint, &[values.len() as i64], values)
    }

    /// An int64 scalar (a zero-dimensional initializer).
    pub fn int_scalar(&mut self, hint: &str, value: i64) -> String {
        self.ints_shaped(hint, &[], &[value])
    }

    fn ints_shaped(&mut self, hint: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.name(hint);
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        name
    }

    /// The finished model.
    pub fn finish(self, name: &str, doc: &str) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("clipmine".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.into()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some(name.into()),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Protobuf's limit on one message: an ONNX file holding its weights must stay under 2 GiB.
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;

/// Tensors smaller than this stay inside the graph when the others go to the external file (as
/// `onnx.save_model`'s `size_threshold`).
const EXTERNAL_ABOVE: usize = 1024;

/// `model` serialised as the file `file` (`image_encoder.onnx`), and, where `external` is set or
/// the graph would reach protobuf's 2 GiB limit, its weights in `{file}.data` beside it: ONNX's
/// external data (each tensor's `location`, `offset` and `length`), which ONNX Runtime reads from
/// the graph's folder. Returns the files (name, bytes).
pub fn encode(mut model: ModelProto, file: &str, external: bool) -> Result<Vec<(String, Vec<u8>)>> {
    use super::proto::{tensor_proto::DataLocation, StringStringEntryProto};
    use prost::Message;
    if !external && model.encoded_len() < PROTOBUF_LIMIT {
        return Ok(vec![(file.to_string(), model.encode_to_vec())]);
    }
    let data_file = format!("{file}.data");
    let mut data: Vec<u8> = vec![];
    let graph = model.graph.as_mut().context("a finished model has a graph")?;
    for t in graph.initializer.iter_mut() {
        if t.raw_data.as_ref().map_or(0, Vec::len) < EXTERNAL_ABOVE {
            continue;
        }
        let raw = t.raw_data.take().unwrap_or_default();
        // As `onnx.save_model` aligns: tensors of 1 MiB or more start on a 64 KiB boundary (the
        // allocation granularity a runtime maps files at, Windows' included).
        if raw.len() >= 1 << 20 {
            data.resize(data.len().next_multiple_of(1 << 16), 0);
        }
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        t.external_data = vec![
            entry("location", data_file.clone()),
            entry("offset", data.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        data.extend_from_slice(&raw);
    }
    let len = model.encoded_len();
    if len >= PROTOBUF_LIMIT {
        bail!(
            "{file} would be {:.1} GB without its weights, over protobuf's 2 GB limit for one ONNX file",
            len as f64 / 1e9
        );
    }
    Ok(vec![(file.to_string(), model.encode_to_vec()), (data_file, data)])
}
