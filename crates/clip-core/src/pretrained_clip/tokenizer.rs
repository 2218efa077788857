//! A checkpoint's own tokenizer: its `tokenizer.json`, a BERT `vocab.txt`, or OpenAI's BPE.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::source;
use crate::config::{ClipConfig, TextKind};
use crate::data::TextTokenizer;
use crate::hub::Hub;

/// How reports name the built-in vocabulary.
pub const BUILT_IN_BPE: &str = "OpenAI's BPE vocabulary (built in: assets/tokenizers/bpe_simple_vocab_16e6.txt.gz)";

/// Where a checkpoint's tokenizer came from.
#[derive(Debug, Clone, serde::Serialize)]
pub enum TokenizerFile {
    /// Its own `tokenizer.json` or `vocab.txt`.
    File(PathBuf),
    /// OpenAI's BPE vocabulary, built in (open_clip checkpoints without tokenizer files).
    OpenAiBpe,
}

impl std::fmt::Display for TokenizerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerFile::File(p) => write!(f, "{}", p.display()),
            TokenizerFile::OpenAiBpe => write!(f, "{BUILT_IN_BPE}"),
        }
    }
}

/// The checkpoint's tokenizer; `None` when the config names no pretrained CLIP. Its ids must fit
/// the text tower's embedding table, or this refuses.
pub fn tokenizer(cfg: &ClipConfig, hub: &Hub) -> Result<Option<(TextTokenizer, TokenizerFile)>> {
    let Some(src) = source(cfg)? else { return Ok(None) };
    let max_len = cfg.max_tokens();
    let (tok, origin) = if let Ok(p) = src.get(hub, "tokenizer.json") {
        (TextTokenizer::from_file(&p, max_len)?, TokenizerFile::File(p))
    } else if let Ok(p) = src.get(hub, "vocab.txt") {
        (TextTokenizer::from_vocab(&p, true, max_len)?, TokenizerFile::File(p))
    } else if cfg.text.kind == TextKind::Clip {
        (TextTokenizer::openai_bpe(max_len)?, TokenizerFile::OpenAiBpe)
    } else {
        bail!("{} has neither a tokenizer.json nor a vocab.txt", src.describe());
    };
    if tok.vocab_size() > cfg.text.vocab_size {
        bail!(
            "the tokenizer ({origin}) gives ids up to {} but the text tower's embedding table has {} rows: the tokenizer is not this checkpoint's",
            tok.vocab_size() - 1,
            cfg.text.vocab_size
        );
    }
    Ok(Some((tok, origin)))
}
