//! The tokenizer: Chinese characters are tokens of their own, ids are reproducible, captions are
//! framed, cut and padded as the text tower expects, and unknown text is reported by name.

use candle_core::Device;
use clip_core::data::{Dataset, LoadOptions, TextTokenizer, SPECIAL_TOKENS};
use clip_core::ClipConfig;

const HERBS: [&str; 4] = ["人蔘", "韓國人蔘", "枸杞", "銀川枸杞"];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn tokens(tok: &TextTokenizer, text: &str) -> Vec<String> {
    tok.encode(text)
        .unwrap()
        .iter()
        .map(|&id| tok.token(id).unwrap())
        .collect()
}

#[test]
fn each_chinese_character_is_its_own_token() {
    let tok = TextTokenizer::train(&strings(&HERBS), 2048, 64).unwrap();
    assert_eq!(tokens(&tok, "銀川枸杞"), ["[CLS]", "銀", "川", "枸", "杞", "[SEP]"]);
    assert_eq!(tokens(&tok, "人蔘"), ["[CLS]", "人", "蔘", "[SEP]"]);
    assert_eq!(tokens(&tok, "枸杞"), ["[CLS]", "枸", "杞", "[SEP]"]);
    let r = tok.unknown_report(&strings(&HERBS)).unwrap();
    assert_eq!((r.captions, r.total_tokens, r.unknown_tokens), (4, 12, 0));
    // 5 specials and the 8 distinct characters: no `##` forms are needed for CJK.
    assert_eq!(tok.vocab_size(), 13);
}

#[test]
fn the_demo_captions_tokenise_without_unknowns() {
    let ds = Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap();
    let cfg = ClipConfig::tiny();
    let captions = ds.captions();
    let tok = TextTokenizer::train(&captions, cfg.text.vocab_size, cfg.max_tokens()).unwrap();
    tok.check_fits(&cfg).unwrap();
    let r = tok.unknown_report(&captions).unwrap();
    assert_eq!(r.unknown_tokens, 0, "{:?}", r.unknown);
    assert!(r.total_tokens > 200, "{r:?}");
    assert_eq!(r.truncated, 0);
    assert_eq!(tokens(&tok, "一杯咖啡"), ["[CLS]", "一", "杯", "咖", "啡", "[SEP]"]);
    // English words are learned whole or in pieces; the caption round-trips.
    let ids = tok.encode("an astronaut in an orange suit, with a helmet").unwrap();
    assert_eq!(
        tok.decode(&ids).unwrap(),
        "an astronaut in an orange suit, with a helmet"
    );
}

#[test]
fn special_tokens_have_berts_ids() {
    let tok = TextTokenizer::train(&strings(&["a cat"]), 100, 16).unwrap();
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.inner().token_to_id(t), Some(i as u32));
    }
    assert_eq!(
        (tok.pad_id(), tok.unk_id(), tok.cls_id(), tok.sep_id()),
        (0, Some(1), 2, 3)
    );
}

#[test]
fn training_is_reproducible() {
    let ds = Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    TextTokenizer::train(&ds.captions(), 300, 64).unwrap().save(&a).unwrap();
    TextTokenizer::train(&ds.captions(), 300, 64).unwrap().save(&b).unwrap();
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        std::fs::read_to_string(&b).unwrap()
    );
}

#[test]
fn a_saved_tokenizer_loads_and_encodes_the_same() {
    let ds = Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap();
    let tok = TextTokenizer::train(&ds.captions(), 2048, 64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/tokenizer.json");
    tok.save(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["model"]["type"], "WordPiece");
    assert_eq!(json["normalizer"]["normalizers"][1]["handle_chinese_chars"], true);
    assert_eq!(json["normalizer"]["normalizers"][1]["strip_accents"], false);
    let loaded = TextTokenizer::from_file(&path, 64).unwrap();
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    for c in ds.captions() {
        assert_eq!(loaded.encode(&c).unwrap(), tok.encode(&c).unwrap(), "{c}");
    }
}

#[test]
fn long_captions_are_cut_keeping_sep_last() {
    let tok = TextTokenizer::train(&strings(&["一二三四五六七八九十"]), 100, 5).unwrap();
    assert_eq!(
        tokens(&tok, "一二三四五六七八九十"),
        ["[CLS]", "一", "二", "三", "[SEP]"]
    );
    assert_eq!(
        tok.unknown_report(&strings(&["一二三四五六七八九十", "一"]))
            .unwrap()
            .truncated,
        1
    );
    assert!(TextTokenizer::train(&strings(&["a"]), 100, 1).is_err());
}

#[test]
fn batches_are_padded_to_the_longest_caption() {
    let tok = TextTokenizer::train(&strings(&["一隻貓", "a cat"]), 100, 16).unwrap();
    let (ids, mask) = tok.encode_batch(&["一隻貓", "貓"], &Device::Cpu).unwrap();
    assert_eq!(ids.dims(), [2, 5]);
    let ids = ids.to_vec2::<u32>().unwrap();
    let mask = mask.to_vec2::<u32>().unwrap();
    let (cls, sep) = (tok.cls_id(), tok.sep_id());
    assert_eq!(ids[0][0], cls);
    assert_eq!(ids[0][4], sep);
    assert_eq!(ids[1][0], cls);
    assert_eq!(ids[1][2], sep);
    assert_eq!(&ids[1][3..], [0, 0]);
    assert_eq!(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]);
}

#[test]
fn lower_case_is_normalised_and_accents_are_kept() {
    let tok = TextTokenizer::train(&strings(&["a cafe", "a café"]), 100, 16).unwrap();
    assert_eq!(tok.encode("A CAFÉ").unwrap(), tok.encode("a café").unwrap());
    assert_ne!(tok.encode("a café").unwrap(), tok.encode("a cafe").unwrap());
}

#[test]
fn unknown_text_is_named() {
    let tok = TextTokenizer::train(&strings(&["a cup of tea", "tea"]), 200, 32).unwrap();
    let r = tok.unknown_report(&strings(&["枸杞 tea", "a cup of 枸杞"])).unwrap();
    assert_eq!(r.unknown_tokens, 4);
    assert_eq!(r.total_tokens, 8);
    assert_eq!(r.unknown, [("枸".to_string(), 2), ("杞".to_string(), 2)]);
    assert!((r.share() - 0.5).abs() < 1e-9);
    assert_eq!(r.examples(5), "枸, 杞");
    // An unknown character inside a word makes the whole word unknown, and is reported whole.
    let r = tok.unknown_report(&strings(&["a cup of teaz"])).unwrap();
    assert_eq!(r.unknown, [("teaz".to_string(), 1)]);
}

#[test]
fn a_tokenizer_too_big_for_the_model_is_refused() {
    let mut cfg = ClipConfig::tiny();
    let ds = Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap();
    let tok = TextTokenizer::train(&ds.captions(), 2048, 64).unwrap();
    cfg.text.vocab_size = 50;
    let err = tok.check_fits(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("text.vocab_size = 50") && err.contains(&format!("at least {}", tok.vocab_size())),
        "{err}"
    );
    // The characters alone need more entries than asked for.
    let err = TextTokenizer::train(&ds.captions(), 50, 64).unwrap_err().to_string();
    assert!(err.contains("raise text.vocab_size"), "{err}");
}

#[test]
fn loading_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let err = format!("{:#}", TextTokenizer::from_file(&missing, 64).unwrap_err());
    assert!(err.contains("missing.json"), "{err}");

    // A tokenizer without [CLS] cannot frame captions as the text tower reads them.
    let path = dir.path().join("tokenizer.json");
    TextTokenizer::train(&strings(&["a cat"]), 100, 16)
        .unwrap()
        .save(&path)
        .unwrap();
    let json = std::fs::read_to_string(&path).unwrap().replace("[CLS]", "<s>");
    std::fs::write(&path, json).unwrap();
    let err = format!("{:#}", TextTokenizer::from_file(&path, 64).unwrap_err());
    assert!(
        err.contains("tokenizer.json has neither BERT's special tokens ([PAD], [CLS], [SEP]) nor CLIP's"),
        "{err}"
    );
}
