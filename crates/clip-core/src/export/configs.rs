//! The config files an export writes: open_clip's `open_clip_config.json`, Hugging Face's
//! `config.json` and `preprocessor_config.json`, and the tokenizer's files.

use serde_json::{json, Value};

use crate::config::{Activation, ClipConfig, ImageArch, ImagePool, TextKind};
use crate::data::TextTokenizer;

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluNew => "gelu_new",
        Activation::Relu => "relu",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// A tower's LayerNorm epsilon and GELU variant where they are not open_clip's defaults
/// (`nn.LayerNorm`'s 1e-5, exact GELU or `quick_gelu`): a student trained from scratch has
/// BERT's 1e-12.
fn tower_kwargs(tower: &mut Value, eps: f64, act: Activation) {
    if eps != 1e-5 {
        tower["norm_kwargs"] = json!({ "eps": eps });
    }
    if act == Activation::GeluNew {
        tower["act_kwargs"] = json!({ "approximate": "tanh" });
    }
}

/// `open_clip_config.json`: `model_cfg` as open_clip's model JSONs spell it, and `preprocess_cfg`.
pub(super) fn open_clip_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
    let i = &cfg.image;
    let t = &cfg.text;
    let vision = match i.arch {
        ImageArch::ClipResnet => json!({
            "image_size": i.image_size,
            "layers": i.depths,
            "width": i.width,
            "head_width": i.width * 32 / i.heads.max(1),
            "patch_size": null,
        }),
        _ => json!({
            "image_size": i.image_size,
            "layers": i.layers,
            "width": i.width,
            "head_width": i.width / i.heads.max(1),
            "mlp_ratio": i.mlp_dim as f64 / i.width.max(1) as f64,
            "patch_size": i.patch_size,
            "pool_type": if i.pool == ImagePool::Avg { "avg" } else { "tok" },
        }),
    };
    let mut vision = vision;
    if i.arch == ImageArch::Vit {
        tower_kwargs(&mut vision, i.layer_norm_eps, i.activation);
    }
    let mut text = json!({
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.dim,
        "heads": t.n_heads,
        "layers": t.n_layers,
        "mlp_ratio": t.hidden_dim as f64 / t.dim.max(1) as f64,
    });
    tower_kwargs(&mut text, t.layer_norm_eps, t.activation);
    if !clip_bpe(tok) {
        // Not OpenAI's BPE: open_clip's own tokenizer would give other ids. Any
        // `hf_tokenizer_name` makes `get_tokenizer("local-dir:…")` read this folder's
        // tokenizer files with transformers (from the Hub, name the repository here).
        text["hf_tokenizer_name"] = json!(".");
        text["pad_id"] = json!(tok.pad_id());
    }
    // clipmine pools at the first end-of-text id; open_clip's default (`argmax`) pools at the
    // largest id, which is the same place only for OpenAI's vocabulary (49407).
    let eos = t.eos_token_id.unwrap_or(tok.sep_id());
    if eos != 49407 || !clip_bpe(tok) {
        text["pool_type"] = json!("eos");
        text["eos_id"] = json!(eos);
    }
    json!({
        "model_cfg": {
            "embed_dim": cfg.projection_dim,
            "quick_gelu": t.activation == Activation::QuickGelu,
            "vision_cfg": vision,
            "text_cfg": text,
        },
        "preprocess_cfg": {
            "mean": i.mean,
            "std": i.std,
            "interpolation": "bicubic",
            "resize_mode": if cfg.data.center_crop { "shortest" } else { "squash" },
        },
    })
}

/// Hugging Face `config.json` for `CLIPModel`, or `ChineseCLIPModel` with a BERT text tower.
pub(super) fn hf_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
    let i = &cfg.image;
    let t = &cfg.text;
    let chinese = t.kind == TextKind::Bert;
    let vision = json!({
        "model_type": if chinese { "chinese_clip_vision_model" } else { "clip_vision_model" },
        "hidden_size": i.width,
        "intermediate_size": i.mlp_dim,
        "num_hidden_layers": i.layers,
        "num_attention_heads": i.heads,
        "image_size": i.image_size,
        "patch_size": i.patch_size,
        "num_channels": 3,
        "hidden_act": act_name(i.activation),
        "layer_norm_eps": i.layer_norm_eps,
        "projection_dim": cfg.projection_dim,
    });
    let text = if chinese {
        json!({
            "model_type": "chinese_clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.dim,
            "num_hidden_layers": t.n_layers,
            "num_attention_heads": t.n_heads,
            "intermediate_size": t.hidden_dim,
            "hidden_act": act_name(t.activation),
            "max_position_embeddings": t.max_position_embeddings,
            "type_vocab_size": t.type_vocab_size,
            "layer_norm_eps": t.layer_norm_eps,
            "hidden_dropout_prob": t.dropout,
            "attention_probs_dropout_prob": t.attention_dropout,
            "pad_token_id": tok.pad_id(),
        })
    } else {
        json!({
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.dim,
            "intermediate_size": t.hidden_dim,
            "num_hidden_layers": t.n_layers,
            "num_attention_heads": t.n_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": act_name(t.activation),
            "layer_norm_eps": t.layer_norm_eps,
            // The tokenizer's own ids (49406 / 49407 for OpenAI's vocabulary).
            "bos_token_id": tok.cls_id(),
            "eos_token_id": t.eos_token_id.unwrap_or(tok.sep_id()),
            "pad_token_id": tok.pad_id(),
            "projection_dim": cfg.projection_dim,
        })
    };
    json!({
        "architectures": [if chinese { "ChineseCLIPModel" } else { "CLIPModel" }],
        "model_type": if chinese { "chinese_clip" } else { "clip" },
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": crate::loss::CLIP_INIT_LOGIT_SCALE,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
        "exported_by": format!("clipmine {}", env!("CARGO_PKG_VERSION")),
    })
}

/// `preprocessor_config.json`: CLIP's shorter side + centre crop, or Chinese-CLIP's square resize.
pub(super) fn preprocessor_config(cfg: &ClipConfig) -> Value {
    let i = &cfg.image;
    let chinese = cfg.text.kind == TextKind::Bert;
    let s = i.image_size;
    // The shorter side before the centre crop: as read from a processor, else the crop over
    // `crop_pct`; and the filter the model was prepared with (PIL's codes).
    let edge = i
        .resize
        .unwrap_or_else(|| (s as f64 / i.crop_pct.clamp(1e-3, 1.0)).round() as usize);
    let resample = match i.interpolation {
        crate::config::Interpolation::Nearest => 0,
        crate::config::Interpolation::Bilinear => 2,
        crate::config::Interpolation::Bicubic => 3,
    };
    json!({
        "image_processor_type": if chinese { "ChineseCLIPImageProcessor" } else { "CLIPImageProcessor" },
        "processor_class": if chinese { "ChineseCLIPProcessor" } else { "CLIPProcessor" },
        "do_resize": true,
        "size": if cfg.data.center_crop { json!({"shortest_edge": edge}) } else { json!({"height": s, "width": s}) },
        "do_center_crop": cfg.data.center_crop,
        "crop_size": {"height": s, "width": s},
        "resample": resample,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": i.mean,
        "image_std": i.std,
        "do_convert_rgb": true,
    })
}

/// Whether `tok` is a CLIP byte-level BPE (OpenAI's vocabulary, or a checkpoint's own with its
/// `<|startoftext|>` … `<|endoftext|>`), which Hugging Face's `CLIPTokenizer` and open_clip's
/// `SimpleTokenizer` reproduce; a WordPiece trained on the captions is not.
pub(super) fn clip_bpe(tok: &TextTokenizer) -> bool {
    tok.token(tok.cls_id()).as_deref() == Some("<|startoftext|>")
        && tok.token(tok.sep_id()).as_deref() == Some("<|endoftext|>")
}

pub(super) fn tokenizer_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
    if cfg.text.kind == TextKind::Clip && !clip_bpe(tok) {
        // A CLIP text transformer over a tokenizer of its own (a student's WordPiece):
        // `tokenizer.json` as it is, with its own special tokens.
        let name = |id: u32| tok.token(id).map(Value::String).unwrap_or(Value::Null);
        let mut c = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.data.max_length.min(cfg.text.max_position_embeddings),
            "bos_token": name(tok.cls_id()),
            "cls_token": name(tok.cls_id()),
            "eos_token": name(tok.sep_id()),
            "sep_token": name(tok.sep_id()),
            "pad_token": name(tok.pad_id()),
        });
        if let Some(unk) = tok.unk_id() {
            c["unk_token"] = name(unk);
        }
        return c;
    }
    if cfg.text.kind == TextKind::Bert {
        json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": true,
            "model_max_length": cfg.data.max_length,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]",
        })
    } else {
        json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": cfg.text.max_position_embeddings,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        })
    }
}

/// BERT's `vocab.txt`: one token per line, in id order.
pub(super) fn vocab_txt(tok: &TextTokenizer) -> String {
    let mut v: Vec<(u32, String)> = tok.inner().get_vocab(true).into_iter().map(|(k, i)| (i, k)).collect();
    v.sort();
    let mut s = String::new();
    for (_, t) in v {
        s.push_str(&t);
        s.push('\n');
    }
    s
}
