//! A model's architecture read from its `config.json`: a timm ResNet's (`architecture`,
//! `model_args`, `pretrained_cfg`) or a Hugging Face DistilBERT / BERT's (`model_type`, sizes).
//! Pure parsing into the config: finding the file is the caller's business.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::{Activation, Block, ImageConfig, Interpolation, TextConfig, TextKind};

/// timm ResNets clipmine's tower reproduces: (block, depths).
fn timm_resnet(arch: &str) -> Option<(Block, [usize; 4])> {
    Some(match arch {
        "resnet18" => (Block::Basic, [2, 2, 2, 2]),
        "resnet34" => (Block::Basic, [3, 4, 6, 3]),
        "resnet26" => (Block::Bottleneck, [2, 2, 2, 2]),
        "resnet50" => (Block::Bottleneck, [3, 4, 6, 3]),
        "resnet101" => (Block::Bottleneck, [3, 4, 23, 3]),
        "resnet152" => (Block::Bottleneck, [3, 8, 36, 3]),
        "resnet200" => (Block::Bottleneck, [3, 24, 36, 3]),
        _ => return None,
    })
}

pub(crate) fn usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .with_context(|| format!("{what} must be a list of whole numbers, got {v}"))
}

pub(crate) fn floats3(v: &Value, what: &str) -> Result<[f64; 3]> {
    let a: Vec<f64> = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .with_context(|| format!("{what} must be a list of numbers, got {v}"))?;
    match a.as_slice() {
        [x] => Ok([*x; 3]),
        [r, g, b] => Ok([*r, *g, *b]),
        _ => bail!("{what} must have 3 values (R, G, B), got {v}"),
    }
}

/// A timm config.json: `architecture`, optional `model_args` (a custom ResNet), `pretrained_cfg`.
pub fn image_config_from_json(img: &mut ImageConfig, json: &Value) -> Result<()> {
    if let Some(mt) = json.get("model_type").and_then(Value::as_str) {
        bail!("this is a Hugging Face transformers model (model_type {mt:?}), not a timm model: the image tower loads timm ResNets such as timm/resnet50.a1_in1k");
    }
    let arch = json
        .get("architecture")
        .and_then(Value::as_str)
        .context("no `architecture` key: the image tower expects a timm model's config.json")?;
    let base = arch.split('.').next().unwrap_or(arch);
    let Some((block, depths)) = timm_resnet(base) else {
        bail!(
            "timm architecture {arch:?} is not one clipmine's ResNet reproduces: use resnet18, resnet26, resnet34, resnet50, resnet101, resnet152 or resnet200 (plain stem, v1.5 blocks; the `d`, `t` and other variants differ)"
        );
    };
    img.block = block;
    img.depths = depths.to_vec();
    img.widths = vec![64, 128, 256, 512];
    img.stem_width = 64;
    img.stem_kernel = 7;
    img.stem_stride = 2;
    img.stem_pool = true;
    if let Some(args) = json.get("model_args").and_then(Value::as_object) {
        for (k, v) in args {
            let default_ok = match k.as_str() {
                "layers" => {
                    img.depths = usizes(v, "model_args.layers")?;
                    true
                }
                "channels" => {
                    img.widths = usizes(v, "model_args.channels")?;
                    true
                }
                // Only timm's deep stems use stem_width; the plain stem is always 64 wide.
                "stem_width" | "num_classes" | "global_pool" | "drop_rate" | "drop_path_rate" | "zero_init_last"
                | "pretrained" => true,
                "in_chans" => v.as_u64() == Some(3),
                "stem_type" => v.as_str() == Some(""),
                "avg_down" | "replace_stem_pool" => v.as_bool() == Some(false),
                "cardinality" | "block_reduce_first" | "down_kernel_size" => v.as_u64() == Some(1),
                "base_width" => v.as_u64() == Some(64),
                "output_stride" => v.as_u64() == Some(32),
                _ => v.is_null(),
            };
            if !default_ok {
                bail!("timm model_args {k} = {v} changes the ResNet in a way clipmine's tower does not reproduce");
            }
        }
    }
    let Some(p) = json.get("pretrained_cfg") else {
        return Ok(());
    };
    if let Some(size) = p.get("input_size") {
        let s = usizes(size, "pretrained_cfg.input_size")?;
        match s.as_slice() {
            [3, h, w] if h == w => img.image_size = *h,
            _ => bail!("pretrained_cfg.input_size {size} is not a square RGB input; clipmine's images are square"),
        }
    }
    if let Some(m) = p.get("mean") {
        img.mean = floats3(m, "pretrained_cfg.mean")?;
    }
    if let Some(s) = p.get("std") {
        img.std = floats3(s, "pretrained_cfg.std")?;
    }
    if let Some(c) = p.get("crop_pct").and_then(Value::as_f64) {
        img.crop_pct = c;
    }
    if let Some(i) = p.get("interpolation").and_then(Value::as_str) {
        img.interpolation = match i {
            "bicubic" => Interpolation::Bicubic,
            "bilinear" => Interpolation::Bilinear,
            "nearest" => Interpolation::Nearest,
            other => bail!("pretrained_cfg.interpolation {other:?} is not one of bilinear, bicubic, nearest"),
        };
    }
    Ok(())
}

fn num(json: &Value, key: &str) -> Result<usize> {
    json.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .with_context(|| format!("no whole number `{key}`"))
}

fn activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluNew,
        "relu" => Activation::Relu,
        other => bail!("activation {other:?} is not one of gelu, gelu_new, relu"),
    })
}

/// A Hugging Face config.json of a DistilBERT or BERT model (`model_type`).
pub fn text_config_from_json(text: &mut TextConfig, json: &Value) -> Result<()> {
    let mt = json
        .get("model_type")
        .and_then(Value::as_str)
        .context("no `model_type` key: the text tower expects a Hugging Face config.json")?;
    let f = |k: &str, default: f64| json.get(k).and_then(Value::as_f64).unwrap_or(default);
    match mt {
        "distilbert" => {
            if json.get("sinusoidal_pos_embds").and_then(Value::as_bool) == Some(true) {
                bail!("sinusoidal position embeddings are not supported (sinusoidal_pos_embds = true)");
            }
            text.kind = TextKind::Distilbert;
            text.dim = num(json, "dim")?;
            text.n_layers = num(json, "n_layers")?;
            text.n_heads = num(json, "n_heads")?;
            text.hidden_dim = num(json, "hidden_dim")?;
            text.dropout = f("dropout", 0.1);
            text.attention_dropout = f("attention_dropout", 0.1);
            text.activation = activation(json.get("activation").and_then(Value::as_str).unwrap_or("gelu"))?;
            // DistilBERT's LayerNorms are built with eps 1e-12, whatever the config says.
            text.layer_norm_eps = 1e-12;
        }
        "bert" => {
            let pos = json.get("position_embedding_type").and_then(Value::as_str).unwrap_or("absolute");
            if pos != "absolute" {
                bail!("position_embedding_type {pos:?} is not supported (only absolute)");
            }
            text.kind = TextKind::Bert;
            text.dim = num(json, "hidden_size")?;
            text.n_layers = num(json, "num_hidden_layers")?;
            text.n_heads = num(json, "num_attention_heads")?;
            text.hidden_dim = num(json, "intermediate_size")?;
            text.type_vocab_size = num(json, "type_vocab_size").unwrap_or(2);
            text.dropout = f("hidden_dropout_prob", 0.1);
            text.attention_dropout = f("attention_probs_dropout_prob", 0.1);
            text.layer_norm_eps = f("layer_norm_eps", 1e-12);
            text.activation = activation(json.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu"))?;
        }
        other => bail!(
            "model_type {other:?} is not a text tower clipmine has: use a DistilBERT or BERT model (kind distilbert or bert), e.g. distilbert/distilbert-base-uncased, google-bert/bert-base-chinese"
        ),
    }
    text.vocab_size = num(json, "vocab_size")?;
    text.max_position_embeddings = num(json, "max_position_embeddings")?;
    Ok(())
}
