//! The one table of tensor names between clipmine's CLIP (Hugging Face's names, under the model's
//! prefixes) and open_clip's: [`crate::export`] reads it one way, [`crate::pretrained_clip`] the
//! other, so a name changed in one direction is changed in both.
//!
//! Each table pairs (clipmine name, open_clip name). A name ending in `.` is a prefix (a module:
//! its `weight` and `bias` follow); any other is a whole tensor's name. What the tables leave out
//! is not a renaming: q, k and v fused into open_clip's `attn.in_proj_*`, the projections stored
//! transposed (`visual.proj`, `text_projection`), and the ModifiedResNet, named alike in both.

/// A residual block's tensors, under clipmine's `encoder.layers.N.` and open_clip's
/// `transformer.resblocks.N.` (q, k and v aside).
pub const BLOCK: &[(&str, &str)] = &[
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
];

/// The Vision Transformer's other tensors, under `image_encoder.model.` and `visual.`.
pub const VISION: &[(&str, &str)] = &[
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.", "ln_pre."),
    ("post_layernorm.", "ln_post."),
];

/// The text transformer's other tensors, under `text_encoder.model.` and open_clip's top level.
pub const TEXT: &[(&str, &str)] = &[
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
];

/// `name`, a clipmine name in `table`, as open_clip calls it.
pub fn to_open_clip(table: &[(&str, &str)], name: &str) -> Option<String> {
    rename(table.iter().copied(), name)
}

/// `name`, an open_clip name in `table`, as clipmine calls it.
pub fn from_open_clip(table: &[(&str, &str)], name: &str) -> Option<String> {
    rename(table.iter().map(|&(ours, theirs)| (theirs, ours)), name)
}

/// `name` renamed by the first pair (from, to) that matches it: a prefix (ending in `.`) keeps
/// what follows it, a whole name must be equal.
fn rename<'a>(mut pairs: impl Iterator<Item = (&'a str, &'a str)>, name: &str) -> Option<String> {
    pairs.find_map(|(from, to)| {
        if from.ends_with('.') {
            name.strip_prefix(from).map(|rest| format!("{to}{rest}"))
        } else {
            (name == from).then(|| to.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_both_ways() {
        for table in [BLOCK, VISION, TEXT] {
            for &(ours, theirs) in table {
                let (a, b) = if ours.ends_with('.') {
                    (format!("{ours}weight"), format!("{theirs}weight"))
                } else {
                    (ours.to_string(), theirs.to_string())
                };
                assert_eq!(to_open_clip(table, &a).as_deref(), Some(b.as_str()));
                assert_eq!(from_open_clip(table, &b).as_deref(), Some(a.as_str()));
            }
        }
        assert_eq!(to_open_clip(VISION, "embeddings.class_embeddingx"), None);
        assert_eq!(from_open_clip(TEXT, "ln_1.weight"), None);
    }
}
