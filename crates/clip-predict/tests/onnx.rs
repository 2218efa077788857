//! `--format onnx` (issue #36): both encoders written as ONNX graphs from clipmine's own layers.
//! Per tower kind, a tiny model (its weights perturbed, so that no bias is zero and no LayerNorm
//! the identity) is exported and run by ONNX Runtime (`xtask/reference/check_onnx.py`, which
//! first passes both graphs through `onnx.checker`); its embeddings must equal
//! `ClipModel::embed_images` / `embed_texts` (unit rows) within 1e-4. Where Python lacks
//! onnxruntime or onnx those tests print why and return; the file's structure (opset, inputs,
//! outputs, free axes), `clip.json` and the refusals are checked in Rust on every run.

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use clip_core::config::{Activation, Block, HeadKind, ImageArch, ImagePool, Pooling, TextKind};
use clip_core::data::TextTokenizer;
use clip_core::export::onnx::proto::{tensor_shape_proto::dimension::Value as DimValue, type_proto, ModelProto};
use clip_core::export::onnx::Quantize;
use clip_core::export::{export, export_with, export_with_caption_teacher, ExportFormat, Options};
use clip_core::nn::normalize::l2_normalize;
use clip_core::{ClipConfig, ClipModel};
use prost::Message;

const CAPTIONS: [&str; 3] = ["a photo of a cat", "cat", "a dog of a photo photo of a cat"];

/// A word-piece vocabulary of the captions' words ([SEP] = 2, [CLS] = 3).
fn tokenizer(dir: &Path) -> TextTokenizer {
    let vocab = dir.join("vocab.txt");
    std::fs::write(&vocab, "[PAD]\n[UNK]\n[SEP]\n[CLS]\n[MASK]\na\nphoto\nof\ncat\ndog\n").unwrap();
    TextTokenizer::from_vocab(&vocab, true, 16).unwrap()
}

/// A ViT (32 px, 8 px patches) with a CLIP text transformer, from scratch.
fn vit_clip() -> ClipConfig {
    let mut cfg = ClipConfig::preset("student-vit-s").unwrap();
    cfg.projection_dim = 16;
    let i = &mut cfg.image;
    (i.image_size, i.patch_size, i.width, i.layers, i.heads, i.mlp_dim) = (32, 8, 16, 2, 2, 32);
    let t = &mut cfg.text;
    (t.vocab_size, t.dim, t.n_layers, t.n_heads, t.hidden_dim) = (64, 16, 2, 2, 32);
    t.max_position_embeddings = 16;
    cfg.data.max_length = 16;
    cfg
}

/// The tower kinds and variants the ONNX writer takes, by name.
fn cases() -> Vec<(&'static str, ClipConfig)> {
    let mut eos = vit_clip();
    eos.text.eos_token_id = Some(2);
    let mut quick = vit_clip();
    (quick.image.activation, quick.text.activation) = (Activation::QuickGelu, Activation::QuickGelu);
    let mut bert = vit_clip();
    (bert.text.kind, bert.text.pooling, bert.text.activation) = (TextKind::Bert, Pooling::Cls, Activation::GeluNew);
    (bert.image.pool, bert.head) = (ImagePool::Avg, HeadKind::Mlp);
    let mut distil = vit_clip();
    (distil.text.kind, distil.text.pooling, distil.text.activation) =
        (TextKind::Distilbert, Pooling::Mean, Activation::Relu);
    let mut student = vit_clip();
    let d = &mut student.distill;
    (d.teacher, d.contrastive, d.affinity, d.feature, d.teacher_dim) =
        (Some("teacher".into()), 0.0, 0.0, 1.0, Some(24));
    let mut resnet = ClipConfig::tiny();
    (resnet.image.image_size, resnet.text.vocab_size, resnet.data.max_length) = (32, 64, 16);
    let mut bottleneck = resnet.clone();
    let i = &mut bottleneck.image;
    (i.block, i.widths, i.stem_pool, i.stem_kernel, i.stem_stride) =
        (Block::Bottleneck, vec![4, 8, 8, 16], false, 3, 1);
    bottleneck.text.kind = TextKind::Bert;
    let mut rn = vit_clip();
    (rn.image.arch, rn.head, rn.image.image_size) = (ImageArch::ClipResnet, HeadKind::Linear, 64);
    (rn.image.depths, rn.image.width, rn.image.heads, rn.image.output_dim) = (vec![1, 2, 1, 1], 4, 2, 16);
    let mut rn_mlp = rn.clone();
    rn_mlp.head = HeadKind::Mlp;
    vec![
        ("modified resnet (attention pool) + clip text", rn),
        ("modified resnet + mlp heads", rn_mlp),
        ("resnet basic + distilbert [CLS] + mlp heads (the recipe)", resnet),
        ("resnet bottleneck + bert [CLS]", bottleneck),
        ("vit + clip text (read at [SEP])", eos),
        ("vit + clip text (last token, quick_gelu)", quick),
        ("vit avg + bert [CLS] + mlp heads (gelu tanh)", bert),
        ("vit + distilbert mean (relu)", distil),
        ("student answering through its maps", student),
    ]
}

/// The model of `cfg` with every value moved off its initial constant, deterministically.
fn perturbed(cfg: &ClipConfig) -> ClipModel {
    let model = ClipModel::new(cfg, &Device::Cpu).unwrap();
    for (k, (_, e)) in model.params.entries().into_iter().enumerate() {
        let t = e.var.as_tensor();
        let n = t.elem_count();
        let noise = Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let noise = noise
            .affine(0.7, k as f64)
            .unwrap()
            .sin()
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap();
        e.var.set(&t.add(&noise.reshape(t.shape()).unwrap()).unwrap()).unwrap();
    }
    model
}

/// Fixed pixels (3 images) and the captions' ids and mask.
fn inputs(cfg: &ClipConfig, tok: &TextTokenizer) -> (Tensor, Tensor, Tensor) {
    let s = cfg.image.image_size;
    let n = 3 * 3 * s * s;
    let px = Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let px = px
        .affine(0.013, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((3, 3, s, s))
        .unwrap();
    let (ids, mask) = tok.encode_batch(&CAPTIONS, &Device::Cpu).unwrap();
    (px, ids, mask)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// `inputs` as check_onnx.py reads them.
fn inputs_json(px: &Tensor, ids: &Tensor, mask: &Tensor) -> serde_json::Value {
    let (_, _, s, _) = px.dims4().unwrap();
    let flat = px.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let nested: Vec<Vec<Vec<Vec<f32>>>> = flat
        .chunks(3 * s * s)
        .map(|i| {
            i.chunks(s * s)
                .map(|c| c.chunks(s).map(<[f32]>::to_vec).collect())
                .collect()
        })
        .collect();
    serde_json::json!({
        "pixel_values": nested,
        "input_ids": ids.to_vec2::<u32>().unwrap(),
        "attention_mask": mask.to_vec2::<u32>().unwrap(),
    })
}

/// Why ONNX Runtime cannot run here, if it cannot.
fn no_runtime() -> Option<String> {
    let o = Command::new("python3")
        .args(["-c", "import onnxruntime, onnx"])
        .output();
    match o {
        Ok(o) if o.status.success() => None,
        // The error's last line (ModuleNotFoundError: …), not the whole traceback.
        Ok(o) => Some(
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => Some(format!("python3: {e}")),
    }
}

/// ONNX Runtime's output of check_onnx.py for the export in `out`.
fn runtime(out: &Path, inputs: &serde_json::Value) -> serde_json::Value {
    let file = out.with_extension("inputs.json");
    std::fs::write(&file, inputs.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/reference/check_onnx.py");
    let o = Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "check_onnx.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The largest |Δ| and the smallest cosine between matching rows.
fn compare(ours: &[Vec<f32>], theirs: &serde_json::Value) -> (f32, f32) {
    let theirs: Vec<Vec<f32>> = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!((ours.len(), ours[0].len()), (theirs.len(), theirs[0].len()));
    let (mut max, mut cos) = (0f32, f32::MAX);
    for (a, b) in ours.iter().zip(&theirs) {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        cos = cos.min(dot / (norm(a) * norm(b)));
        max = a.iter().zip(b).fold(max, |m, (x, y)| m.max((x - y).abs()));
    }
    (max, cos)
}

#[test]
fn onnx_runtime_gives_clipmines_embeddings_for_every_tower_kind() {
    if let Some(why) = no_runtime() {
        println!("skipped: python3 cannot import onnxruntime and onnx ({why}); pip install onnxruntime onnx");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    for (k, (name, cfg)) in cases().into_iter().enumerate() {
        let model = perturbed(&cfg);
        let (px, ids, mask) = inputs(&cfg, &tok);
        let image = rows(&l2_normalize(&model.embed_images(&px).unwrap()).unwrap());
        let text = rows(&l2_normalize(&model.embed_texts(&ids, &mask).unwrap()).unwrap());
        let out = dir.path().join(format!("onnx{k}"));
        export(&model, &tok, ExportFormat::Onnx, &out, false).unwrap();
        let r = runtime(&out, &inputs_json(&px, &ids, &mask));
        assert_eq!(r["opset"], 17);
        let (di, ci) = compare(&image, &r["image_embeds"]);
        let (dt, ct) = compare(&text, &r["text_embeds"]);
        println!("{name}: image max|Δ| {di:.2e} min cos {ci:.7}; text max|Δ| {dt:.2e} min cos {ct:.7}");
        assert!(di < 1e-4 && dt < 1e-4, "{name}: image {di}, text {dt}");
        assert!(ci > 1.0 - 1e-4 && ct > 1.0 - 1e-4, "{name}: image {ci}, text {ct}");
    }
}

/// How many nodes of each operator `path`'s graph has, and how many MatMuls and Convs read a weight
/// (an initializer) as their second input.
fn operators(path: &Path) -> (std::collections::HashMap<String, usize>, usize) {
    let g = decoded(path).graph.unwrap();
    let weights: std::collections::HashSet<_> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let mut ops = std::collections::HashMap::new();
    let mut float_weights = 0;
    for n in &g.node {
        *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
        if matches!(n.op_type(), "MatMul" | "Conv") && n.input.get(1).is_some_and(|w| weights.contains(w)) {
            float_weights += 1;
        }
    }
    (ops, float_weights)
}

#[test]
fn int8_graphs_run_integer_operators_and_stay_close_to_fp32_for_every_tower_kind() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let runtime_here = no_runtime();
    if let Some(why) = &runtime_here {
        println!("the runtime's check skipped: python3 cannot import onnxruntime and onnx ({why}); pip install onnxruntime onnx");
    }
    for (k, (name, cfg)) in cases().into_iter().enumerate() {
        let model = perturbed(&cfg);
        let (fp32, int8) = (
            dir.path().join(format!("fp32-{k}")),
            dir.path().join(format!("int8-{k}")),
        );
        export(&model, &tok, ExportFormat::Onnx, &fp32, false).unwrap();
        let options = Options {
            quantize: Some(Quantize::Int8),
            ..Options::default()
        };
        let e = export_with(&model, &tok, ExportFormat::Onnx, &int8, options).unwrap();
        // No fp32 weight is left to a MatMul or Conv; every tower has integer MatMuls (its head
        // at least).
        for graph in ["image_encoder.onnx", "text_encoder.onnx"] {
            let (ops, float_weights) = operators(&int8.join(graph));
            assert_eq!(float_weights, 0, "{name} {graph}: {ops:?}");
            assert!(ops.get("MatMulInteger") > Some(&0), "{name} {graph}: {ops:?}");
            // No Gather reads an fp32 table (rows wider than the one-column scales gathered beside
            // the int8 rows): the token table, and BERT's token types, are int8.
            let g = decoded(&int8.join(graph)).graph.unwrap();
            let tables: std::collections::HashSet<_> = g
                .initializer
                .iter()
                .filter(|t| t.data_type == Some(1) && t.dims.len() == 2 && t.dims[1] > 1)
                .map(|t| t.name().to_string())
                .collect();
            let fp32_gathers = g
                .node
                .iter()
                .filter(|n| n.op_type() == "Gather" && tables.contains(&n.input[0]))
                .count();
            assert_eq!(fp32_gathers, 0, "{name} {graph}");
            // Convolutions compute in fp32 on kernels stored int8.
            let convs = operators(&fp32.join(graph)).0.get("Conv").copied();
            assert_eq!(ops.get("Conv").copied(), convs, "{name} {graph}");
            assert_eq!(ops.get("DequantizeLinear").copied(), convs, "{name} {graph}");
            let size = |d: &Path| std::fs::metadata(d.join(graph)).unwrap().len();
            assert!(
                size(&int8) < size(&fp32),
                "{name} {graph}: {} ≥ {}",
                size(&int8),
                size(&fp32)
            );
        }
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(int8.join("clip.json")).unwrap()).unwrap();
        let q = &meta["quantization"];
        assert!(q["image_encoder"]["matmuls"].as_u64() > Some(0), "{meta}");
        // The Python lines `clip-predict export` prints give the sessions that option too.
        assert!(
            e.python
                .contains("add_session_config_entry(\"session.disable_quant_qdq\", \"1\")"),
            "{}",
            e.python
        );
        assert!(q["text_encoder"]["embeddings"].as_u64() > Some(0), "{meta}");
        assert_eq!(meta["session_config"]["session.disable_quant_qdq"], "1", "{meta}");
        let plain: serde_json::Value = serde_json::from_slice(&std::fs::read(fp32.join("clip.json")).unwrap()).unwrap();
        assert!(
            plain.get("session_config").is_none() && plain.get("quantization").is_none(),
            "{plain}"
        );
        if runtime_here.is_some() {
            continue;
        }
        let (px, ids, mask) = inputs(&cfg, &tok);
        let image = rows(&l2_normalize(&model.embed_images(&px).unwrap()).unwrap());
        let text = rows(&l2_normalize(&model.embed_texts(&ids, &mask).unwrap()).unwrap());
        let r = runtime(&int8, &inputs_json(&px, &ids, &mask));
        let ((di, ci), (dt, ct)) = (compare(&image, &r["image_embeds"]), compare(&text, &r["text_embeds"]));
        println!("{name}, int8: image max|Δ| {di:.2e} min cos {ci:.5}; text max|Δ| {dt:.2e} min cos {ct:.5}");
        // Quantization moves the embeddings (fp32 gives 1e-4), but keeps their direction.
        assert!(ci > 0.998 && ct > 0.998, "{name}: image {ci}, text {ct}");
        assert!(
            di > 1e-6 || dt > 1e-6,
            "{name}: the int8 graphs computed exactly what fp32 does"
        );
    }
    // The README's cost script runs on an int8 export (its figures come from it).
    if runtime_here.is_none() {
        let out = dir.path().join("int8-8");
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/captions.csv");
        for task in [
            vec!["recall", "--pairs", demo.to_str().unwrap()],
            vec!["speed", "--seconds", "0.05", "--batch", "2"],
        ] {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/reference/onnx_int8_cost.py");
            let o = Command::new("python3")
                .arg(script)
                .args(&task)
                .arg(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{task:?}: {}", String::from_utf8_lossy(&o.stderr));
            let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            println!("{line}");
            assert_eq!(line["weights"], "int8", "{line}");
            let figure = if task[0] == "recall" {
                "text_to_image_recall@1"
            } else {
                "images_per_s"
            };
            assert!(line[figure].as_f64().is_some_and(|x| x >= 0.0), "{line}");
        }
    }
    // Other formats have no integer weights.
    let e = predict(&[
        "export",
        "--model",
        "tiny-clip",
        "--format",
        "hf",
        "--quantize",
        "int8",
        "x",
    ]);
    assert_eq!(e.0, Some(2), "{e:?}");
    assert!(e.2.contains("--quantize int8 applies to --format onnx only"), "{}", e.2);
}

#[test]
fn external_data_puts_the_weights_beside_the_graphs_and_the_runtime_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    for (k, quantize) in [None, Some(Quantize::Int8)].into_iter().enumerate() {
        let (name, cfg) = cases().swap_remove(2); // the recipe: timm ResNet + DistilBERT
        let model = perturbed(&cfg);
        let (inside, apart) = (
            dir.path().join(format!("inside{k}")),
            dir.path().join(format!("apart{k}")),
        );
        let options = |external_data| Options {
            quantize,
            external_data,
            ..Options::default()
        };
        export_with(&model, &tok, ExportFormat::Onnx, &inside, options(false)).unwrap();
        let e = export_with(&model, &tok, ExportFormat::Onnx, &apart, options(true)).unwrap();
        for graph in ["image_encoder.onnx", "text_encoder.onnx"] {
            let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let data = apart.join(format!("{graph}.data"));
            assert!(e.files.contains(&data), "{:?}", e.files);
            assert!(!inside.join(format!("{graph}.data")).exists());
            // The weights moved: the graph keeps the small tensors, the .data file the rest.
            assert!(size(&apart.join(graph)) * 4 < size(&inside.join(graph)), "{graph}");
            assert!(
                size(&data) + size(&apart.join(graph)) > size(&inside.join(graph)),
                "{graph}"
            );
            // Each external tensor's bytes, at its offset and length in the .data file, are the
            // inline export's.
            let g = decoded(&apart.join(graph)).graph.unwrap();
            let inline = decoded(&inside.join(graph)).graph.unwrap();
            let bytes = std::fs::read(&data).unwrap();
            let mut external = 0;
            for t in g.initializer.iter().filter(|t| t.data_location == Some(1)) {
                let entry = |k: &str| {
                    t.external_data
                        .iter()
                        .find(|e| e.key() == k)
                        .unwrap()
                        .value()
                        .to_string()
                };
                assert_eq!(entry("location"), format!("{graph}.data"));
                let (offset, length): (usize, usize) =
                    (entry("offset").parse().unwrap(), entry("length").parse().unwrap());
                let same = inline.initializer.iter().find(|i| i.name() == t.name()).unwrap();
                assert_eq!(
                    &bytes[offset..offset + length],
                    same.raw_data(),
                    "{graph}: {}",
                    t.name()
                );
                external += 1;
            }
            assert!(external > 0, "{graph}");
        }
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(apart.join("clip.json")).unwrap()).unwrap();
        assert_eq!(meta["external_data"], true);
        // An export with .data files is still an export: --overwrite replaces it.
        let again = Options {
            overwrite: true,
            ..options(true)
        };
        export_with(&model, &tok, ExportFormat::Onnx, &apart, again).unwrap();
        if let Some(why) = no_runtime() {
            println!("the runtime's check skipped: {why}");
            continue;
        }
        let (px, ids, mask) = inputs(&cfg, &tok);
        let json = inputs_json(&px, &ids, &mask);
        let (a, b) = (runtime(&inside, &json), runtime(&apart, &json));
        let same = |key: &str| {
            compare(
                &serde_json::from_value::<Vec<Vec<f32>>>(a[key].clone()).unwrap(),
                &b[key],
            )
        };
        let ((di, _), (dt, _)) = (same("image_embeds"), same("text_embeds"));
        println!("{name}, {quantize:?}: weights apart against inside, image max|Δ| {di:.1e}, text {dt:.1e}");
        assert!(di == 0.0 && dt == 0.0, "image {di}, text {dt}");
    }
    let e = predict(&[
        "export",
        "--model",
        "tiny-clip",
        "--format",
        "open_clip",
        "--external-data",
        "x",
    ]);
    assert!(e.2.contains("--external-data applies to --format onnx only"), "{}", e.2);
}

/// (name, element type, dims: a free axis by name) of each input or output.
fn signature(values: &[clip_core::export::onnx::proto::ValueInfoProto]) -> Vec<(String, i32, Vec<String>)> {
    values
        .iter()
        .map(|v| {
            let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.clone()) else {
                panic!("{:?} is no tensor", v.name)
            };
            let dims = t.shape.unwrap().dim.into_iter().map(|d| match d.value {
                Some(DimValue::DimValue(n)) => n.to_string(),
                Some(DimValue::DimParam(s)) => s,
                None => "?".into(),
            });
            (v.name.clone().unwrap(), t.elem_type.unwrap(), dims.collect())
        })
        .collect()
}

fn decoded(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

#[test]
fn the_graphs_declare_opset_17_and_free_batch_and_sequence_axes() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let (_, cfg) = cases().swap_remove(8);
    let model = perturbed(&cfg);
    let out = dir.path().join("onnx");
    let e = export(&model, &tok, ExportFormat::Onnx, &out, false).unwrap();
    assert_eq!(e.layout, "onnx");
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "clip.json",
            "image_encoder.onnx",
            "preprocessor_config.json",
            "text_encoder.onnx",
            "tokenizer.json"
        ]
    );
    let (float, int64) = (1, 7);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let image = decoded(&out.join("image_encoder.onnx"));
    assert_eq!((image.opset_import[0].version, image.ir_version), (Some(17), Some(8)));
    let g = image.graph.unwrap();
    assert_eq!(
        signature(&g.input),
        [("pixel_values".into(), float, s(&["batch", "3", "32", "32"]))]
    );
    // The student answers in its teacher's 24-wide space: the map is inside the graph.
    assert_eq!(
        signature(&g.output),
        [("image_embeds".into(), float, s(&["batch", "24"]))]
    );
    assert!(g
        .initializer
        .iter()
        .any(|t| t.name().starts_with("distill.image_map.weight")));
    let text = decoded(&out.join("text_encoder.onnx")).graph.unwrap();
    let ids = s(&["batch", "sequence"]);
    assert_eq!(
        signature(&text.input),
        [
            ("input_ids".into(), int64, ids.clone()),
            ("attention_mask".into(), int64, ids)
        ]
    );
    assert_eq!(
        signature(&text.output),
        [("text_embeds".into(), float, s(&["batch", "24"]))]
    );
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("clip.json")).unwrap()).unwrap();
    assert_eq!(
        (meta["embedding_dim"].as_u64(), meta["opset"].as_u64()),
        (Some(24), Some(17))
    );
    assert_eq!(meta["image"]["image_size"], 32);
    assert_eq!(meta["text"]["context_length"], 16);
    // Replaced whole, and only when asked to.
    let e = export(&model, &tok, ExportFormat::Onnx, &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already holds an export") && e.contains("--overwrite"),
        "{e}"
    );
    std::fs::write(out.join("image_encoder.onnx"), b"stale").unwrap();
    export(&model, &tok, ExportFormat::Onnx, &out, true).unwrap();
    let mut again: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    again.sort();
    assert_eq!(again, names);
    assert!(std::fs::metadata(out.join("image_encoder.onnx")).unwrap().len() > 1000);
    let scale = model.logit_scale().unwrap().unwrap();
    assert!(
        (meta["logit_scale"].as_f64().unwrap() - scale as f64).abs() < 1e-4,
        "{meta}"
    );
}

#[test]
fn a_student_distilled_on_images_alone_exports_its_teachers_text_encoder() {
    // Its own text tower learned nothing: clipmine answers its captions with the teacher's.
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut cfg = vit_clip();
    let d = &mut cfg.distill;
    (
        d.teacher,
        d.images_only,
        d.contrastive,
        d.affinity,
        d.feature,
        d.teacher_dim,
    ) = (Some("teacher".into()), true, 0.0, 0.0, 1.0, Some(24));
    let student = perturbed(&cfg);
    let mut t = vit_clip();
    (t.projection_dim, t.text.kind, t.text.pooling) = (24, TextKind::Bert, Pooling::Cls);
    let teacher = perturbed(&t);
    // Without its teacher: refused, nothing written.
    let out = dir.path().join("onnx");
    let e = format!(
        "{:#}",
        export(&student, &tok, ExportFormat::Onnx, &out, false).unwrap_err()
    );
    assert!(e.contains("distilled on images without captions"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only vocab.txt");
    // Nor does a format without a place for a second model take it.
    let e = export_with_caption_teacher(&student, &tok, (&teacher, &tok), ExportFormat::Hf, &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("distilled on images without captions"), "{e}");
    export_with_caption_teacher(&student, &tok, (&teacher, &tok), ExportFormat::Onnx, &out, false).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("clip.json")).unwrap()).unwrap();
    assert_eq!(meta["text"]["tower"], "the teacher's");
    assert_eq!(meta["embedding_dim"], 24);
    if let Some(why) = no_runtime() {
        println!("skipped the runtime's check: {why}");
        return;
    }
    let (px, ids, mask) = inputs(&cfg, &tok);
    let r = runtime(&out, &inputs_json(&px, &ids, &mask));
    let image = rows(&l2_normalize(&student.embed_images(&px).unwrap()).unwrap());
    let text = rows(&l2_normalize(&teacher.embed_texts(&ids, &mask).unwrap()).unwrap());
    let ((di, ci), (dt, ct)) = (compare(&image, &r["image_embeds"]), compare(&text, &r["text_embeds"]));
    println!("student distilled on images alone: image max|Δ| {di:.2e} min cos {ci:.7}; teacher's text max|Δ| {dt:.2e} min cos {ct:.7}");
    assert!(di < 1e-4 && dt < 1e-4, "image {di}, text {dt}");
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/clip/hub")
}

/// `clip-predict ARGS` on the fixture hub: (exit code, stdout, stderr).
fn predict(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures())
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    clipmine_tests::outcome(&o)
}

/// One of the README's examples (the block in `lang` under "Ship it: ONNX").
fn readme_example(lang: &str) -> String {
    let readme = include_str!("../../../README.md");
    let section = &readme[readme
        .find("## Ship it: ONNX")
        .expect("the README has its ONNX section")..];
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).unwrap_or_else(|| panic!("no {lang} example")) + fence.len();
    section[start..start + section[start..].find("```").unwrap()].to_string()
}

/// The cosines `clip-predict image-to-text --model MODEL IMAGE --texts …` prints, per caption.
fn clip_predict_cosines(model: &str, image: &str, captions: &[&str]) -> Vec<f64> {
    let mut args = vec!["image-to-text", "--model", model, image, "--texts"];
    args.extend(captions);
    args.push("--json");
    let (code, stdout, err) = predict(&args);
    assert_eq!(code, Some(0), "{err}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ranked = answer["results"][0]["captions"].as_array().unwrap();
    captions
        .iter()
        .map(|&t| {
            ranked.iter().find(|c| c["caption"] == t).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// The cosines the README's example in `lang` (python, js) prints for the export `out` and `image`.
fn readme_cosines(lang: &str, out: &Path, image: &str) -> Vec<f64> {
    let script = readme_example(lang)
        .replace("exported/mine-onnx", out.to_str().unwrap())
        .replace("photo.png", image);
    let o = match lang {
        "python" => Command::new("python3").args(["-c", &script]).output().unwrap(),
        // CommonJS, so that NODE_PATH finds the packages of xtask/reference/node.
        _ => Command::new("node")
            .args(["-e", &script])
            .env("NODE_PATH", node_modules())
            .output()
            .unwrap(),
    };
    assert!(
        o.status.success(),
        "the README's {lang} example: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Where `npm ci --ignore-scripts --prefix xtask/reference/node` installs the Node example's packages.
fn node_modules() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/reference/node/node_modules")
}

/// Each fixture checkpoint (open_clip ViT, its average-pool variant, ModifiedResNet, Hugging Face
/// CLIP, Chinese-CLIP) exported by `clip-predict export --format onnx` and read by the README's
/// example gives `clip-predict image-to-text`'s cosines: tokenizer, preprocessing and graphs.
#[test]
fn the_readme_python_example_gives_clip_predicts_cosines() {
    let o = Command::new("python3")
        .args(["-c", "import onnxruntime, tokenizers, PIL, numpy"])
        .output();
    if !o.as_ref().is_ok_and(|o| o.status.success()) {
        println!("skipped: python3 cannot import onnxruntime, tokenizers, PIL and numpy; pip install onnxruntime tokenizers pillow numpy");
        return;
    }
    readme_example_gives_clip_predicts_cosines("python");
}

/// Each fixture checkpoint (open_clip ViT, its average-pool variant, ModifiedResNet, Hugging Face
/// CLIP, Chinese-CLIP) exported by `clip-predict export --format onnx` and read by the README's
/// example in `lang` gives `clip-predict image-to-text`'s cosines: tokenizer, preprocessing and graphs.
fn readme_example_gives_clip_predicts_cosines(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Of three lengths, and one Chinese, so that Chinese-CLIP's vocabulary tells them apart too.
    let captions = ["a photo of a cat", "a dog", "一只猫的照片"];
    for (name, px) in [
        ("oc-vit", 32),
        ("oc-vit-avg", 32),
        ("oc-rn", 64),
        ("hf-clip", 32),
        ("cn-clip", 32),
    ] {
        let snaps = fixtures().join(format!("models--test--{name}/snapshots"));
        let model = std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path();
        let model = model.to_str().unwrap();
        let out = dir.path().join(format!("{name}-onnx"));
        let (code, stdout, err) = predict(&[
            "export",
            "--model",
            model,
            "--format",
            "onnx",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code, Some(0), "{name}: {err}");
        let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(printed["layout"], "onnx");
        let image = fixtures().join(format!("../goldens/image{px}_0.png"));
        let ours = clip_predict_cosines(model, image.to_str().unwrap(), &captions);
        let theirs = readme_cosines(lang, &out, image.to_str().unwrap());
        let d = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!("{name}: clip-predict {ours:?} ONNX Runtime from {lang} {theirs:?} max |Δ| {d:.1e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// The README's Node example, on the same exports (onnxruntime-node, tokenizers.js and pngjs, as
/// `xtask/reference/node` pins them).
#[test]
fn the_readme_node_example_gives_clip_predicts_cosines() {
    let node = Command::new("node").arg("--version").output();
    let packages = ["onnxruntime-node", "pngjs", "@huggingface/tokenizers"];
    let missing: Vec<&str> = packages
        .into_iter()
        .filter(|p| !node_modules().join(p).is_dir())
        .collect();
    if !node.as_ref().is_ok_and(|o| o.status.success()) || !missing.is_empty() {
        println!(
            "skipped: node or its packages ({}) are missing; npm ci --ignore-scripts --prefix xtask/reference/node",
            missing.join(", ")
        );
        return;
    }
    readme_example_gives_clip_predicts_cosines("js");
}
