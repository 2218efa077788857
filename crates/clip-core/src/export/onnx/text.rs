//! The text encoder graph: token ids and attention mask (N, L) int64 → the tower (the CLIP text
//! transformer, or a BERT / DistilBERT) → its head → (for a student that answers in its teacher's
//! space) the map → unit rows (N, P). Masks as the candle towers build them: 0 where attended,
//! −1e9 where not, added to the attention scores.

use anyhow::Result;

use super::graph::{Attr, Dim, Graph};
use super::layers::{bert_block, clip_block, layer_norm, BlockShape};
use super::vision::embed;
use crate::config::{ClipConfig, Pooling, TextConfig, TextKind};
use crate::model::bert_scheme;

const TOWER: &str = "text_encoder.model";

fn p(n: &str) -> String {
    format!("{TOWER}.{n}")
}

/// Token embeddings plus the first L rows of the position table (`crate::model`'s
/// `PositionEmbedding`): (N, L, D).
fn embeddings(g: &mut Graph, ids: &str, tokens: &str, positions: &str) -> Result<String> {
    let table = g.weight(&p(tokens), None)?;
    let x = g.op("Gather", &[&table, ids], vec![Attr::Int("axis", 0)]);
    let pos = g.weight(&p(positions), None)?;
    let len = g.op("Shape", &[ids], vec![Attr::Int("start", 1), Attr::Int("end", 2)]);
    let (zero, axis) = (g.ints("zero", &[0]), g.ints("axis", &[0]));
    let pos = g.op("Slice", &[&pos, &zero, &len, &axis], vec![]);
    Ok(g.op("Add", &[&x, &pos], vec![]))
}

/// The key mask (N, 1, 1, L): (mask − 1)·1e9.
fn key_mask(g: &mut Graph, mask: &str) -> String {
    let m = g.op("Cast", &[mask], vec![Attr::Int("to", 1)]);
    let (one, big) = (g.constant("one", &[], &[1.0]), g.constant("big", &[], &[1e9]));
    let m = g.op("Sub", &[&m, &one], vec![]);
    let m = g.op("Mul", &[&m, &big], vec![]);
    let axes = g.ints("axes", &[1, 2]);
    g.op("Unsqueeze", &[&m, &axes], vec![])
}

/// The causal bias (L, L), −1e9 where a key comes after its query, plus the key mask.
fn causal_mask(g: &mut Graph, ids: &str, keys: &str) -> String {
    let len = g.op("Shape", &[ids], vec![Attr::Int("start", 1), Attr::Int("end", 2)]);
    let square = g.op("Concat", &[&len, &len], vec![Attr::Int("axis", 0)]);
    let full = g.op("ConstantOfShape", &[&square], vec![Attr::Scalar("value", -1e9)]);
    let k = g.int_scalar("above_diagonal", 1);
    let causal = g.op("Trilu", &[&full, &k], vec![Attr::Int("upper", 1)]);
    g.op("Add", &[&causal, keys], vec![])
}

/// Each caption's read-out position (N, 1), as `crate::model::eot_positions`: its first
/// end-of-text token among the attended ones, else its last attended token (0 for none).
fn eot_positions(g: &mut Graph, ids: &str, mask: &str, eos: Option<u32>) -> String {
    let zero = g.int_scalar("zero", 0);
    let masked = g.op("Equal", &[mask, &zero], vec![]);
    let seen = g.op("Not", &[&masked], vec![]);
    let seen_f = g.op("Cast", &[&seen], vec![Attr::Int("to", 1)]);
    // (position + 1) where attended, 0 elsewhere: its largest value sits at the last attended.
    let len = g.op("Shape", &[ids], vec![Attr::Int("start", 1), Attr::Int("end", 2)]);
    let (start, step) = (g.constant("start", &[], &[1.0]), g.constant("step", &[], &[1.0]));
    let len_f = g.op("Cast", &[&len], vec![Attr::Int("to", 1)]);
    let one = g.constant("one", &[], &[1.0]);
    let limit = g.op("Add", &[&len_f, &one], vec![]);
    let axes = g.ints("axes", &[0]);
    let limit = g.op("Squeeze", &[&limit, &axes], vec![]);
    let ranks = g.op("Range", &[&start, &limit, &step], vec![]);
    let score = g.op("Mul", &[&seen_f, &ranks], vec![]);
    let argmax = vec![Attr::Int("axis", 1), Attr::Int("keepdims", 1)];
    let last = g.op("ArgMax", &[&score], argmax.clone());
    let Some(eos) = eos else { return last };
    let e = g.int_scalar("eos", eos as i64);
    let is_eos = g.op("Equal", &[ids, &e], vec![]);
    let is_eos = g.op("And", &[&is_eos, &seen], vec![]);
    let is_eos = g.op("Cast", &[&is_eos], vec![Attr::Int("to", 1)]);
    let first = g.op("ArgMax", &[&is_eos], argmax);
    let any = g.op(
        "ReduceMax",
        &[&is_eos],
        vec![Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 1)],
    );
    let half = g.constant("half", &[], &[0.5]);
    let any = g.op("Greater", &[&any, &half], vec![]);
    g.op("Where", &[&any, &first, &last], vec![])
}

fn shape(t: &TextConfig) -> BlockShape {
    BlockShape {
        width: t.dim,
        heads: t.n_heads,
        activation: t.activation,
        eps: t.layer_norm_eps,
    }
}

/// The CLIP text transformer: causal blocks → `final_layer_norm` → the state at each caption's
/// end-of-text token (N, D).
fn clip_text(g: &mut Graph, ids: &str, mask: &str, t: &TextConfig) -> Result<String> {
    let mut x = embeddings(
        g,
        ids,
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
    )?;
    let keys = key_mask(g, mask);
    let bias = causal_mask(g, ids, &keys);
    for i in 0..t.n_layers {
        x = clip_block(g, &x, &p(&format!("encoder.layers.{i}")), shape(t), Some(&bias))?;
    }
    let x = layer_norm(g, &x, &p("final_layer_norm"), t.layer_norm_eps)?;
    let at = eot_positions(g, ids, mask, t.eos_token_id);
    Ok(g.op("GatherND", &[&x, &at], vec![Attr::Int("batch_dims", 1)]))
}

/// A BERT or DistilBERT: embeddings (+ BERT's token type 0) → LayerNorm → post-LN layers → the
/// [CLS] state or the mean of the attended tokens' states (N, D).
fn bert(g: &mut Graph, ids: &str, mask: &str, t: &TextConfig) -> Result<String> {
    let mut x = embeddings(
        g,
        ids,
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
    )?;
    let names = bert_scheme(t.kind);
    if names.token_types {
        // One segment: every token has type 0.
        let table = g.weight(&p("embeddings.token_type_embeddings.weight"), None)?;
        let first = g.int_scalar("type_0", 0);
        let row = g.op("Gather", &[&table, &first], vec![Attr::Int("axis", 0)]);
        x = g.op("Add", &[&x, &row], vec![]);
    }
    x = layer_norm(g, &x, &p("embeddings.LayerNorm"), t.layer_norm_eps)?;
    let bias = key_mask(g, mask);
    for i in 0..t.n_layers {
        x = bert_block(g, &x, &p(&format!("{}.{i}", names.layers)), names, shape(t), &bias)?;
    }
    Ok(match t.pooling {
        Pooling::Cls | Pooling::Eot => {
            let first = g.int_scalar("cls", 0);
            g.op("Gather", &[&x, &first], vec![Attr::Int("axis", 1)])
        }
        Pooling::Mean => {
            let m = g.op("Cast", &[mask], vec![Attr::Int("to", 1)]);
            let axes = g.ints("axes", &[2]);
            let m = g.op("Unsqueeze", &[&m, &axes], vec![]);
            let sum_axes = g.ints("tokens", &[1]);
            let x = g.op("Mul", &[&x, &m], vec![]);
            let keep = vec![Attr::Int("keepdims", 0)];
            let sum = g.op("ReduceSum", &[&x, &sum_axes], keep.clone());
            let count = g.op("ReduceSum", &[&m, &sum_axes], keep);
            let tiny = g.constant("tiny", &[], &[1e-9]);
            let count = g.op("Max", &[&count, &tiny], vec![]);
            g.op("Div", &[&sum, &count], vec![])
        }
    })
}

/// `text_encoder.onnx`: `input_ids`, `attention_mask` (N, L) int64 → `text_embeds` (N, P).
pub fn text_encoder(g: &mut Graph, cfg: &ClipConfig, width: usize) -> Result<()> {
    let dims = [Dim::Free("batch"), Dim::Free("sequence")];
    let ids = g.input("input_ids", true, &dims);
    let mask = g.input("attention_mask", true, &dims);
    let features = match cfg.text.kind {
        TextKind::Clip => clip_text(g, &ids, &mask, &cfg.text)?,
        TextKind::Bert | TextKind::Distilbert => bert(g, &ids, &mask, &cfg.text)?,
    };
    let e = embed(g, &features, cfg, Some("text_projection"), "text_map")?;
    g.output(&e, "text_embeds", &[Dim::Free("batch"), Dim::Fixed(width)]);
    Ok(())
}
