//! No input makes the loaders panic: arbitrary bytes (and arbitrary near-valid input, which
//! reaches deeper) into the captions parsers, the config loader and the tokenizer give a value or
//! an error, never a panic. Case counts are kept modest so the suite stays fast on 2 cores.

use std::path::Path;

use clip_core::data::{Dataset, LoadOptions, TextTokenizer};
use clip_core::ClipConfig;
use proptest::prelude::*;

const CASES: u32 = 256;

/// Text that looks like a captions file: a real header and rows mixing separators, quotes,
/// escapes, odd names and non-ASCII text.
fn near_captions() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        Just("image,caption\n"),
        Just("image\tcaption\n"),
        Just("image|caption\n"),
        Just("id,image_name,comment\n"),
        Just("\u{feff}\"image\",\"caption\"\r\n"),
    ];
    let piece = prop_oneof![
        Just("a.png".to_string()),
        Just(",".to_string()),
        Just("\t".to_string()),
        Just("|".to_string()),
        Just("\"".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("../x.png".to_string()),
        Just("/etc/passwd".to_string()),
        Just("images/a.png".to_string()),
        Just("パンの写真".to_string()),
        Just("{\"image\": \"a.png\", \"caption\": [\"x\", 1]}".to_string()),
        Just("\u{0}".to_string()),
        any::<String>(),
    ];
    (header, proptest::collection::vec(piece, 0..24)).prop_map(|(h, p)| {
        let mut b = h.as_bytes().to_vec();
        b.extend(p.concat().into_bytes());
        b
    })
}

fn near_json_lines() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("\"a.png\"".to_string()),
        Just("\"\"".to_string()),
        Just("[\"one\", \"two\"]".to_string()),
        Just("[]".to_string()),
        Just("null".to_string()),
        Just("1e999".to_string()),
        Just("{}".to_string()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let key = prop_oneof![
        Just("image"),
        Just("caption"),
        Just("Captions"),
        Just(" file "),
        Just("x")
    ];
    proptest::collection::vec(proptest::collection::vec((key, value), 0..4), 0..6).prop_map(|lines| {
        lines
            .into_iter()
            .map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
                format!("{{{}}}\n", fields.join(", "))
            })
            .collect::<String>()
            .into_bytes()
    })
}

/// Loads `bytes` as `dir/name` (next to `dir/a.png`): any result but a panic is fine; an error
/// says something.
fn load(dir: &Path, name: &str, bytes: &[u8]) {
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    for skip_bad in [false, true] {
        let opts = LoadOptions {
            skip_bad,
            ..LoadOptions::default()
        };
        match Dataset::load(&file, &opts) {
            Ok(ds) => {
                assert!(!ds.pairs.is_empty());
                assert!(ds
                    .pairs
                    .iter()
                    .all(|p| p.image < ds.images.len() && !p.caption.is_empty()));
            }
            Err(e) => assert!(!format!("{e:#}").is_empty()),
        }
    }
}

fn dataset_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::new(4, 4).save(dir.path().join("a.png")).unwrap();
    dir
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn captions_files_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = dataset_dir();
        for name in ["captions.csv", "captions.tsv", "captions.jsonl"] {
            load(dir.path(), name, &bytes);
        }
    }

    #[test]
    fn delimited_captions_near_the_format(bytes in near_captions()) {
        let dir = dataset_dir();
        for name in ["captions.csv", "captions.tsv", "captions.txt"] {
            load(dir.path(), name, &bytes);
        }
    }

    #[test]
    fn json_lines_near_the_format(bytes in near_json_lines()) {
        let dir = dataset_dir();
        load(dir.path(), "captions.jsonl", &bytes);
    }
}

/// A TOML value of any kind a config key might be given.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..300).prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| if v.is_nan() {
            "nan".into()
        } else if v.is_infinite() {
            if v > 0.0 {
                "inf".into()
            } else {
                "-inf".into()
            }
        } else {
            format!("{v:?}")
        }),
        proptest::collection::vec(0i64..9, 0..80).prop_map(|v| format!("{v:?}")),
        proptest::collection::vec(any::<i64>(), 0..4).prop_map(|v| format!("{v:?}")),
        Just("\"tiny\"".to_string()),
        Just("\"simple-clip\"".to_string()),
        Just("\"soft\"".to_string()),
        any::<String>().prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("{}".to_string()),
    ]
}

const KEYS: [&str; 32] = [
    "preset",
    "name",
    "loss",
    "seed",
    "projection_dim",
    "head_dropout",
    "temperature",
    "image.image_size",
    "image.depths",
    "image.widths",
    "image.stem_width",
    "image.stem_kernel",
    "image.stem_stride",
    "image.stem_pool",
    "text.dim",
    "text.n_heads",
    "text.vocab_size",
    "text.n_layers",
    "text.hidden_dim",
    "text.max_position_embeddings",
    "text.dropout",
    "text.attention_dropout",
    "train.batch_size",
    "train.epochs",
    "train.accumulate",
    "train.lr_image",
    "train.lr_text",
    "train.lr_head",
    "train.freeze_image",
    "data.val_fraction",
    "data.max_length",
    "data.center_crop",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn configs_of_arbitrary_text(text in any::<String>()) {
        let _ = ClipConfig::from_toml_str(&text);
    }

    #[test]
    fn configs_with_arbitrary_values(entries in proptest::collection::btree_map(0..KEYS.len(), toml_value(), 0..12)) {
        let text: String = entries.iter().map(|(&k, v)| format!("{} = {v}\n", KEYS[k])).collect();
        if let Ok(cfg) = ClipConfig::from_toml_str(&text) {
            // What the loader accepts round-trips and has a usable caption length.
            prop_assert!(cfg.max_tokens() >= 2);
            let again = ClipConfig::from_toml_str(&cfg.to_toml().unwrap());
            prop_assert!(again.is_ok(), "{text}\n→ {:?}", again.err());
        }
    }

    #[test]
    fn tokenizer_training_and_encoding(captions in proptest::collection::vec(any::<String>(), 0..6),
                                       vocab_size in 0usize..300,
                                       max_len in 0usize..20,
                                       probe in any::<String>()) {
        if let Ok(tok) = TextTokenizer::train(&captions, vocab_size, max_len) {
            for text in captions.iter().chain([&probe]) {
                let ids = tok.encode(text).unwrap();
                prop_assert!(ids.len() >= 2 && ids.len() <= max_len);
                prop_assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
                tok.decode(&ids).unwrap();
            }
            tok.unknown_report(&captions).unwrap();
            let (ids, mask) = tok.encode_batch(&[probe.as_str(), ""], &candle_core::Device::Cpu).unwrap();
            prop_assert_eq!(ids.dims(), mask.dims());
        }
    }

    #[test]
    fn tokenizer_files_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300), max_len in 0usize..20) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &bytes).unwrap();
        let _ = TextTokenizer::from_file(&path, max_len);
    }
}

/// Found by reading `validate`, and the kind of value the random configs rarely reach (every
/// other key must type-check first): sizes that overflow when multiplied.
#[test]
fn configs_whose_sizes_overflow_are_errors() {
    let ones = vec!["1"; 70].join(", ");
    for text in [
        format!("image.depths = [{ones}]\nimage.widths = [{ones}]\n"),
        format!("image.stem_stride = {}\nimage.stem_pool = true\nimage.depths = [1, 1, 1, 1]\nimage.widths = [8, 8, 8, 8]\n", i64::MAX),
    ] {
        let err = ClipConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("smaller than the ResNet's total stride"), "{text}: {err}");
    }
}
