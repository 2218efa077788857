//! Captions in any language: normalisation never merges distinct words (Japanese voicing marks,
//! Thai, Arabic and Devanagari vowel signs survive), kana and Hangul are split one syllable per
//! token as CJK ideographs are, and the training captions never become `[UNK]`.

use std::collections::HashSet;

use clip_core::data::TextTokenizer;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn tokens(tok: &TextTokenizer, text: &str) -> Vec<String> {
    let ids = tok.encode(text).unwrap();
    ids[1..ids.len() - 1].iter().map(|&id| tok.token(id).unwrap()).collect()
}

const JAPANESE: [&str; 6] = [
    "パン",
    "バン",
    "ハン",
    "焼きたてのパンとコーヒー",
    "白いバンが駐車場に止まっている",
    "はんこを押す",
];
const KOREAN: [&str; 4] = ["사과 한 개", "사과 두 개", "인삼차 한 잔", "한국 인삼"];
const THAI: [&str; 5] = ["ข้าว", "ขาว", "ข่าว", "ข้าวผัดกับไก่", "แมวสีขาวนอนบนโซฟา"];
const MARKS: [&str; 6] = ["كتب", "كُتُب", "كَتَبَ", "कि", "क", "की"];

/// Trains on every caption above and checks: no `[UNK]`, and distinct captions give distinct ids.
#[test]
fn distinct_captions_in_any_script_give_distinct_ids_and_no_unknowns() {
    let all: Vec<&str> = JAPANESE
        .iter()
        .chain(&KOREAN)
        .chain(&THAI)
        .chain(&MARKS)
        .copied()
        .collect();
    let tok = TextTokenizer::train(&strings(&all), 4096, 64).unwrap();
    let r = tok.unknown_report(&strings(&all)).unwrap();
    assert_eq!(r.unknown_tokens, 0, "{:?}", r.unknown);
    let mut seen = HashSet::new();
    for c in &all {
        let ids = tok.encode(c).unwrap();
        assert!(
            seen.insert(ids.clone()),
            "{c:?} has the same ids as another caption: {ids:?}"
        );
    }
}

#[test]
fn japanese_voicing_marks_are_kept_and_kana_split_per_character() {
    let tok = TextTokenizer::train(&strings(&JAPANESE), 4096, 64).unwrap();
    assert_eq!(tokens(&tok, "パン"), ["パ", "ン"]);
    assert_eq!(tokens(&tok, "バン"), ["バ", "ン"]);
    assert_eq!(tokens(&tok, "ハン"), ["ハ", "ン"]);
    assert_eq!(
        tokens(&tok, "焼きたてのパンとコーヒー"),
        ["焼", "き", "た", "て", "の", "パ", "ン", "と", "コ", "ー", "ヒ", "ー"]
    );
    // A new combination of known kana is no [UNK]: every kana is a word of its own.
    let r = tok.unknown_report(&strings(&["ハンコーヒー"])).unwrap();
    assert_eq!(r.unknown_tokens, 0, "{:?}", r.unknown);
    // The same word typed decomposed (ハ + combining ゚) reads as the composed one.
    assert_eq!(tok.encode("ハ\u{309A}ン").unwrap(), tok.encode("パン").unwrap());
}

#[test]
fn hangul_is_split_per_syllable() {
    let tok = TextTokenizer::train(&strings(&KOREAN), 4096, 64).unwrap();
    assert_eq!(tokens(&tok, "사과 한 개"), ["사", "과", "한", "개"]);
    assert_eq!(tokens(&tok, "한국 인삼"), ["한", "국", "인", "삼"]);
    let r = tok.unknown_report(&strings(&["인삼 사과"])).unwrap();
    assert_eq!(r.unknown_tokens, 0, "{:?}", r.unknown);
}

#[test]
fn thai_arabic_and_devanagari_marks_are_kept() {
    let tok = TextTokenizer::train(
        &strings(&THAI.iter().chain(&MARKS).copied().collect::<Vec<_>>()),
        4096,
        64,
    )
    .unwrap();
    // rice, white, news: the same letters, told apart only by their marks.
    let (rice, white, news) = (
        tok.encode("ข้าว").unwrap(),
        tok.encode("ขาว").unwrap(),
        tok.encode("ข่าว").unwrap(),
    );
    assert!(rice != white && white != news && rice != news);
    assert_ne!(tok.encode("كُتُب").unwrap(), tok.encode("كتب").unwrap());
    assert_ne!(tok.encode("कि").unwrap(), tok.encode("क").unwrap());
    assert_ne!(tok.encode("की").unwrap(), tok.encode("कि").unwrap());
}

#[test]
fn latin_is_still_lower_cased_and_the_saved_tokenizer_reads_the_same() {
    let captions = strings(&["A Cat on a mat", "パンとバン", "사과 한 개", "ข้าวผัด"]);
    let tok = TextTokenizer::train(&captions, 4096, 64).unwrap();
    assert_eq!(
        tok.encode("a cat ON A MAT").unwrap(),
        tok.encode("A Cat on a mat").unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = TextTokenizer::from_file(&path, 64).unwrap();
    for c in &captions {
        assert_eq!(back.encode(c).unwrap(), tok.encode(c).unwrap(), "{c}");
    }
    assert_eq!(tokens(&back, "バンとパン"), ["バ", "ン", "と", "パ", "ン"]);
}
