//! Captions → token ids: a BERT-style WordPiece tokenizer, trained on the captions or loaded from
//! a `tokenizer.json`.
//!
//! A pretrained English vocabulary turns most Chinese characters into `[UNK]`, and a model cannot
//! learn what it cannot see. Training the vocabulary on the captions themselves, with BERT's
//! normaliser (which puts every CJK character in a word of its own), makes 人蔘, 枸杞 and 銀川枸杞
//! sequences of known single-character tokens. The tokenizer is saved next to the checkpoint so
//! predictions read text exactly as training did.
//!
//! The trained tokenizer never merges distinct words: BERT's accent stripping (NFD, then every
//! combining mark deleted) would make パン, バン and ハン one word and erase Thai, Arabic and
//! Devanagari vowel signs, so it is off; text is NFC-composed instead (the same word typed
//! composed or decomposed gives the same ids) and lower-cased. Kana and Hangul syllables are split
//! one per token, as CJK ideographs are: Japanese is written without spaces, and a run of kana
//! would otherwise be one long word (past 100 characters, a single `[UNK]`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer,
};

use super::wordpiece::train_vocab;
use crate::config::ClipConfig;

/// BERT's special tokens, with the ids a trained tokenizer gives them (0, 1, 2, 3, 4).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const PREFIX: &str = "##";

fn tk<T>(r: tokenizers::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!(e))
}

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad: u32,
    cls: u32,
    sep: u32,
    unk: Option<u32>,
    vocab_size: usize,
}

/// The vocabulary size and special ids (the full vocabulary would flood a test failure).
impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("max_len", &self.max_len)
            .field("pad", &self.pad)
            .field("cls", &self.cls)
            .field("sep", &self.sep)
            .field("unk", &self.unk)
            .finish()
    }
}

/// How well a tokenizer covers some captions.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnkReport {
    pub captions: usize,
    /// Tokens of all captions, without [CLS]/[SEP] and without truncation.
    pub total_tokens: usize,
    pub unknown_tokens: usize,
    /// The text that became [UNK] (a character or a whole word), with counts, most frequent first
    /// (ties in order of appearance).
    pub unknown: Vec<(String, usize)>,
    /// Captions longer than the tokenizer's `max_len` (they are cut, keeping [SEP] last).
    pub truncated: usize,
}

impl UnkReport {
    /// Unknown tokens as a share of all tokens (0 when there are none).
    pub fn share(&self) -> f64 {
        if self.total_tokens == 0 {
            0.0
        } else {
            self.unknown_tokens as f64 / self.total_tokens as f64
        }
    }

    /// The first `n` unknown texts, comma-separated, e.g. "枸, 杞".
    pub fn examples(&self, n: usize) -> String {
        let mut s = self
            .unknown
            .iter()
            .take(n)
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if self.unknown.len() > n {
            s.push_str(&format!(" … ({} distinct)", self.unknown.len()));
        }
        s
    }
}

impl TextTokenizer {
    /// Trains a WordPiece vocabulary of at most `vocab_size` entries on `captions` (see
    /// [`normalizer`] and [`pre_tokenizer`]: lower case, accents and other marks kept, each CJK
    /// character, kana and Hangul syllable a word of its own). The same captions always give the
    /// same tokenizer.
    pub fn train(captions: &[String], vocab_size: usize, max_len: usize) -> Result<Self> {
        if captions.is_empty() {
            bail!("no captions to train a tokenizer on");
        }
        let normalizer = normalizer();
        let pre_tokenizer = pre_tokenizer()?;
        let mut words: BTreeMap<String, u64> = BTreeMap::new();
        for c in captions {
            let mut n = NormalizedString::from(c.as_str());
            tk(normalizer.normalize(&mut n))?;
            let mut pre = PreTokenizedString::from(n);
            tk(pre_tokenizer.pre_tokenize(&mut pre))?;
            for (w, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                *words.entry(w.to_string()).or_default() += 1;
            }
        }
        let vocab = train_vocab(&words, &SPECIAL_TOKENS, vocab_size, PREFIX).map_err(|needed| {
            anyhow::anyhow!(
                "the captions use so many distinct characters that the tokenizer needs {needed} entries for them alone, more than the vocabulary size {vocab_size}: raise text.vocab_size to at least {needed}"
            )
        })?;
        let vocab: serde_json::Map<String, serde_json::Value> =
            vocab.into_iter().enumerate().map(|(i, t)| (t, i.into())).collect();
        // Through JSON because `WordPiece`'s builder wants the `ahash` map type of its own.
        let json = serde_json::json!({
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": PREFIX,
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        });
        let model: WordPiece = serde_json::from_str(&json.to_string()).context("building the WordPiece model")?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(normalizer))
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), 3), ("[CLS]".into(), 2))))
            .with_decoder(Some(WordPieceDecoder::new(PREFIX.into(), true)));
        inner.add_special_tokens(&SPECIAL_TOKENS.map(|t| AddedToken::from(t, true)));
        Self::wrap(inner, max_len, "the trained tokenizer")
    }

    /// Loads a `tokenizer.json` (ours, or a BERT-style one from the Hub). Its own padding and
    /// truncation settings are ignored: captions are cut at `max_len` and padded per batch.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let inner = tk(Tokenizer::from_file(path)).with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::wrap(inner, max_len, &format!("tokenizer {}", path.display()))
    }

    /// A tokenizer from the text of a `tokenizer.json` (read and verified by the caller); `what`
    /// names it in errors.
    pub fn from_json(json: &[u8], max_len: usize, what: &str) -> Result<Self> {
        let inner = tk(Tokenizer::from_bytes(json)).with_context(|| format!("reading tokenizer {what}"))?;
        Self::wrap(inner, max_len, &format!("tokenizer {what}"))
    }

    /// OpenAI CLIP's byte-level BPE over its published vocabulary (`bpe_simple_vocab_16e6.txt.gz`,
    /// built in), for checkpoints that bring no tokenizer files (open_clip's `timm/…openai`,
    /// `laion/…` repos). Built as Hugging Face's `CLIPTokenizerFast` describes it — NFC, runs of
    /// whitespace to one space, lower case; CLIP's split pattern; byte-level BPE with `</w>`
    /// ending each word — so its ids equal Hugging Face's. They equal open_clip's
    /// `SimpleTokenizer` too, except where open_clip first runs `ftfy.fix_text` and
    /// `html.unescape` (curly quotes, full-width forms, ligatures, mojibake, `&amp;`), which
    /// neither Hugging Face nor clipmine does.
    pub fn openai_bpe(max_len: usize) -> Result<Self> {
        let json = openai_bpe_json()?;
        Self::from_json(json.as_bytes(), max_len, "OpenAI's BPE vocabulary (built in)")
    }

    /// BERT's WordPiece pipeline (the `tokenizers` crate's BERT normaliser, pre-tokenizer,
    /// WordPiece model, [CLS]/[SEP] post-processor and decoder) over a `vocab.txt`, for models
    /// on the Hub that ship only their vocabulary (bert-base-chinese's first releases and others).
    pub fn from_vocab(vocab: &Path, lowercase: bool, max_len: usize) -> Result<Self> {
        let what = format!("vocabulary {}", vocab.display());
        let path = vocab
            .to_str()
            .with_context(|| format!("{what}: the path is not UTF-8"))?;
        let model = tk(WordPiece::from_file(path)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix(PREFIX.into())
            .build())
        .with_context(|| format!("reading {what}"))?;
        let mut inner = Tokenizer::new(model);
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .with_context(|| format!("{what} has no {t} token: clipmine needs a BERT-style vocabulary"))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))))
            .with_decoder(Some(WordPieceDecoder::new(PREFIX.into(), true)));
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Self::wrap(inner, max_len, &what)
    }

    fn wrap(mut inner: Tokenizer, max_len: usize, what: &str) -> Result<Self> {
        if max_len < 2 {
            bail!("the longest caption must allow at least 2 tokens (start and end), got {max_len}");
        }
        inner.with_padding(None);
        tk(inner.with_truncation(None).map(|_| ()))?;
        // BERT's specials, else CLIP's start/end of text (CLIP pads with 0 after the end token,
        // as open_clip does: the causal mask makes the pad id irrelevant).
        let bert = (
            inner.token_to_id("[PAD]"),
            inner.token_to_id("[CLS]"),
            inner.token_to_id("[SEP]"),
        );
        let clip = (inner.token_to_id("<|startoftext|>"), inner.token_to_id("<|endoftext|>"));
        let (pad, cls, sep) = match (bert, clip) {
            ((Some(p), Some(c), Some(s)), _) => (p, c, s),
            (_, (Some(c), Some(s))) => (0, c, s),
            _ => bail!(
                "{what} has neither BERT's special tokens ([PAD], [CLS], [SEP]) nor CLIP's (<|startoftext|>, <|endoftext|>): clipmine cannot tell where a caption starts and ends"
            ),
        };
        let unk = inner.token_to_id("[UNK]");
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        Ok(Self {
            inner,
            max_len,
            pad,
            cls,
            sep,
            unk,
            vocab_size,
        })
    }

    /// The `tokenizer.json` text (Hugging Face format: it loads in Python too).
    pub fn to_json(&self) -> Result<String> {
        tk(self.inner.to_string(true))
    }

    /// Writes `tokenizer.json` atomically (Hugging Face format: it loads in Python too).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::files::write_atomic(path, json.as_bytes())
            .with_context(|| format!("writing tokenizer {}", path.display()))
    }

    /// `[CLS] tokens… [SEP]`, cut to at most `max_len` ids with [SEP] kept last.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = tk(self.inner.encode(text, false))?;
        let body = enc.get_ids();
        let keep = body.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(self.cls);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.sep);
        Ok(ids)
    }

    /// Encodes and pads to the longest caption: (ids, mask), each (B, L) u32, mask 1 on tokens.
    pub fn encode_batch(&self, texts: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
        let seqs = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>>>()?;
        let (ids, mask, l) = pad(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>(), self.pad);
        Ok((
            Tensor::from_vec(ids, (texts.len(), l), device)?,
            Tensor::from_vec(mask, (texts.len(), l), device)?,
        ))
    }

    /// Ids needed by the embedding table (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Fails, saying what to change, when the ids do not fit the text tower's embedding table.
    pub fn check_fits(&self, cfg: &ClipConfig) -> Result<()> {
        if self.vocab_size > cfg.text.vocab_size {
            bail!(
                "the tokenizer has {} entries but the text tower's embedding table has text.vocab_size = {}: raise text.vocab_size to at least {}, or train a smaller tokenizer",
                self.vocab_size,
                cfg.text.vocab_size,
                self.vocab_size
            );
        }
        if self.max_len > cfg.text.max_position_embeddings {
            bail!(
                "captions of up to {} tokens do not fit the text tower's {} positions",
                self.max_len,
                cfg.text.max_position_embeddings
            );
        }
        Ok(())
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn cls_id(&self) -> u32 {
        self.cls
    }
    pub fn sep_id(&self) -> u32 {
        self.sep
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids back to text (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        tk(self.inner.decode(ids, true))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Counts the tokens of `captions` that are [UNK], and recovers the text each one stood for
    /// (through the encoding's offsets into the caption).
    pub fn unknown_report(&self, captions: &[String]) -> Result<UnkReport> {
        let mut r = UnkReport {
            captions: captions.len(),
            ..Default::default()
        };
        // In order of first appearance, so ties read as the captions do ("枸, 杞").
        let mut unknown: Vec<(String, usize)> = vec![];
        let mut index: HashMap<String, usize> = HashMap::new();
        for c in captions {
            let enc = tk(self.inner.encode(c.as_str(), false))?;
            r.total_tokens += enc.len();
            if enc.len() + 2 > self.max_len {
                r.truncated += 1;
            }
            for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                if Some(id) == self.unk {
                    r.unknown_tokens += 1;
                    let text = c.get(s..e).unwrap_or("?").to_string();
                    let i = *index.entry(text.clone()).or_insert_with(|| {
                        unknown.push((text, 0));
                        unknown.len() - 1
                    });
                    unknown[i].1 += 1;
                }
            }
        }
        unknown.sort_by_key(|u| std::cmp::Reverse(u.1));
        r.unknown = unknown;
        Ok(r)
    }
}

/// The trained tokenizer's normaliser: NFC, then BERT's (control characters removed, spaces
/// around CJK ideographs, lower case) without its accent stripping. Built from `tokenizers`'
/// own parts so `tokenizer.json` describes it and loads anywhere.
pub(crate) fn normalizer() -> NormalizerSequence {
    NormalizerSequence::new(vec![
        NormalizerWrapper::from(NFC),
        NormalizerWrapper::from(BertNormalizer::new(true, true, Some(false), true)),
    ])
}

/// Kana (hiragana, katakana, half-width katakana) and Hangul, each character with the marks
/// that follow it: one word per syllable.
const SYLLABLE: &str = r"[\p{Hiragana}\p{Katakana}\p{Hangul}][\p{Mn}\p{Mc}]*";

/// The trained tokenizer's pre-tokeniser: BERT's (whitespace and punctuation), then every kana
/// and Hangul syllable split off as a word of its own.
pub(crate) fn pre_tokenizer() -> Result<PreTokenizerSequence> {
    let syllables = tk(Split::new(
        SplitPattern::Regex(SYLLABLE.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    ))?;
    Ok(PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::from(BertPreTokenizer),
        PreTokenizerWrapper::from(syllables),
    ]))
}

/// OpenAI's BPE merges (the file open_clip and OpenAI's `clip` ship, MIT licence).
const OPENAI_BPE_GZ: &[u8] = include_bytes!("../../../../assets/tokenizers/bpe_simple_vocab_16e6.txt.gz");

/// GPT-2's byte → printable character table, in its own order (printable bytes first).
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().filter_map(char::from_u32).collect()
}

/// The `tokenizer.json` of OpenAI's BPE, as `CLIPTokenizerFast.save_pretrained` writes it.
fn openai_bpe_json() -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(OPENAI_BPE_GZ)
        .read_to_string(&mut text)
        .context("unpacking the built-in BPE vocabulary")?;
    // open_clip: merges = lines[1 : 49152 - 256 - 2 + 1].
    let merges: Vec<&str> = text.split('\n').skip(1).take(49152 - 256 - 2).collect();
    let chars = bytes_to_unicode();
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    let mut pairs = Vec::with_capacity(merges.len());
    for m in &merges {
        let (a, b) = m
            .split_once(' ')
            .context("a malformed merge in the built-in BPE vocabulary")?;
        vocab.push(format!("{a}{b}"));
        pairs.push(serde_json::json!([a, b]));
    }
    let (sot, eot) = (vocab.len(), vocab.len() + 1);
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::json!(i)))
        .collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(sot, "<|startoftext|>"), special(eot, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eot],
            "cls": ["<|startoftext|>", sot], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": pairs},
    });
    Ok(json.to_string())
}

/// CLIP's split pattern (open_clip's, with the special tokens kept whole).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Pads sequences to the longest with `pad`: (ids, mask, L), row-major (B, L).
pub(crate) fn pad(seqs: &[&[u32]], pad: u32) -> (Vec<u32>, Vec<u32>, usize) {
    pad_to(seqs, pad, 0)
}

/// [`pad`] to at least `len` tokens: a rank's share of a batch is padded as the whole batch.
pub(crate) fn pad_to(seqs: &[&[u32]], pad: u32, len: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let l = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(len);
    let mut ids = Vec::with_capacity(seqs.len() * l);
    let mut mask = Vec::with_capacity(seqs.len() * l);
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, l - s.len()));
        mask.extend(std::iter::repeat_n(1, s.len()));
        mask.extend(std::iter::repeat_n(0, l - s.len()));
    }
    (ids, mask, l)
}
