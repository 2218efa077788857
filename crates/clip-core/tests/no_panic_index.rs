//! No image index manifest makes `ImageIndex::load` panic (issue #32): arbitrary bytes, and a
//! real index's manifest.json with values swapped, removed or cut, give an index or an error —
//! never a panic, and never an allocation above 1 GB (this binary's allocator refuses one, which
//! aborts the process naming its size). What loads holds only entries inside its folder, answers
//! searches, and can be updated and saved. The companion of `no_panic.rs` (the other loaders),
//! kept in its own binary; case counts are modest so it stays fast on 2 cores.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clip_core::index::{check_entry_path, GraphPolicy, ImageIndex, IndexOptions, SearchMode, MANIFEST};
use proptest::prelude::*;
use serde_json::{json, Value};

const CASES: u32 = 256;

mod alloc_guard;

const DIM: usize = 8;

fn embed(paths: &[PathBuf]) -> anyhow::Result<clip_core::index::Embedded> {
    let rows: Vec<f32> = (0..paths.len() * DIM).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    let t = Tensor::from_vec(rows, (paths.len(), DIM), &Device::Cpu)?;
    Ok((Some(t), (0..paths.len()).collect(), vec![]))
}

/// A real index (`index/`: two segments, both with a graph, and a version 1 embeddings file
/// beside them for manifests without a version) of `photos/`.
fn real_index() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(photos.join("sub")).unwrap();
    for f in ["a.jpg", "b.jpg", "sub/c.png"] {
        std::fs::write(photos.join(f), f).unwrap();
    }
    let opts = IndexOptions {
        graph: GraphPolicy::Always,
        ..IndexOptions::default()
    };
    let (mut idx, _) = ImageIndex::update_with(None, "fp", DIM, &photos, &opts, embed).unwrap();
    idx.save(&dir).unwrap();
    std::fs::write(photos.join("d.jpg"), "d").unwrap();
    std::fs::write(photos.join("e.jpg"), "e").unwrap();
    let previous = ImageIndex::load(&dir).unwrap();
    let (mut idx, _) = ImageIndex::update_with(Some(previous), "fp", DIM, &photos, &opts, embed).unwrap();
    idx.save(&dir).unwrap();
    let t = Tensor::zeros((5, DIM), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings".to_string(), t)]),
        dir.join("embeddings.safetensors"),
    )
    .unwrap();
    (tmp, photos, dir)
}

/// Loads `bytes` as the index's manifest: an error says something; an index holds only entries
/// inside its folder, answers, and updates into a fresh folder without a panic.
fn check(dir: &Path, photos: &Path, bytes: &[u8]) {
    std::fs::write(dir.join(MANIFEST), bytes).unwrap();
    match ImageIndex::load(dir) {
        Err(e) => assert!(!format!("{e:#}").is_empty()),
        Ok(idx) => {
            for (i, e) in idx.entries.iter().enumerate() {
                assert!(check_entry_path(&e.path).is_ok(), "{:?}", e.path);
                assert!(idx.path_of(i).starts_with(&idx.root));
            }
            if idx.dim() <= 4096 {
                let q = vec![0.5; idx.dim()];
                for mode in [SearchMode::Exact, SearchMode::Compact, SearchMode::Approx] {
                    let hits = idx.search_with(&q, 3, mode).unwrap();
                    assert!(hits.iter().all(|(i, _)| *i < idx.len()));
                }
            }
            let out = dir.with_file_name("updated");
            let _ = std::fs::remove_dir_all(&out);
            let opts = IndexOptions::default();
            if let Ok((mut idx, _)) = ImageIndex::update_with(Some(idx), "fp", DIM, photos, &opts, embed) {
                idx.save(&out).unwrap();
            }
        }
    }
}

/// Where a near-valid manifest is changed.
const POINTERS: [&str; 22] = [
    "/version",
    "/fingerprint",
    "/root",
    "/dim",
    "/next_segment",
    "/segments",
    "/segments/0",
    "/segments/0/id",
    "/segments/0/rows",
    "/segments/0/graph",
    "/segments/1/id",
    "/segments/1/rows",
    "/entries",
    "/entries/0",
    "/entries/0/path",
    "/entries/0/segment",
    "/entries/0/row",
    "/entries/1/row",
    "/entries/3/path",
    "/entries/0/size",
    "/entries/0/modified_ns",
    "/entries/2/inode",
];

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(null)),
        (0u64..6).prop_map(Value::from),
        Just(json!(-1)),
        Just(json!(u32::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        Just(json!(0.5)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!("a.jpg")),
        Just(json!("sub/c.png")),
        Just(json!("../x.jpg")),
        Just(json!("/etc/passwd")),
        Just(json!("etc/passwd")),
        Just(json!("a\\b.jpg")),
        Just(json!("x\u{0}.jpg")),
        Just(json!("/")),
        Just(json!(".")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([{"id": 1, "rows": 3, "graph": true}, {"id": 1, "rows": 3, "graph": true}])),
        Just(json!({"path": "a.jpg", "size": 1, "modified": 2, "segment": 1, "row": 0})),
        any::<String>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ]
}

/// Replaces (or, with `None`, removes) the value at `pointer`, adding it to an object that
/// lacks it.
fn edit(m: &mut Value, pointer: &str, to: Option<Value>) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let Some(p) = m.pointer_mut(parent) else { return };
    match (p, to) {
        (Value::Object(o), Some(v)) => {
            o.insert(key.to_string(), v);
        }
        (Value::Object(o), None) => {
            o.remove(key);
        }
        (Value::Array(a), to) => match (key.parse::<usize>(), to) {
            (Ok(i), Some(v)) if i < a.len() => a[i] = v,
            (Ok(i), None) if i < a.len() => {
                a.remove(i);
            }
            _ => {}
        },
        _ => {}
    }
}

type Edits = (Vec<(usize, Option<Value>)>, Option<prop::sample::Index>);

fn edits() -> impl Strategy<Value = Edits> {
    (
        proptest::collection::vec((0..POINTERS.len(), proptest::option::weighted(0.8, value())), 1..5),
        proptest::option::weighted(0.2, any::<prop::sample::Index>()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn index_manifests_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (_tmp, photos, dir) = real_index();
        check(&dir, &photos, &bytes);
    }

    #[test]
    fn index_manifests_near_the_format((changes, cut) in edits()) {
        let (_tmp, photos, dir) = real_index();
        let mut m: Value = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        for (p, to) in changes {
            edit(&mut m, POINTERS[p], to);
        }
        let mut bytes = serde_json::to_vec(&m).unwrap();
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len() + 1));
        }
        check(&dir, &photos, &bytes);
    }
}

/// What the near-valid cases found or guard most directly, spelled out.
#[test]
fn index_manifests_from_the_issue_are_errors() {
    let (_tmp, _photos, dir) = real_index();
    let good: Value = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    for (ptr, v) in [
        ("/entries/0/path", json!("../x.jpg")),
        ("/entries/0/path", json!("/etc/passwd")),
        ("/entries/0/path", json!("etc/passwd")),
        ("/dim", json!(u64::MAX)),
        ("/segments/0/rows", json!(u64::MAX)),
        ("/segments/1/id", json!(1)),
    ] {
        let mut m = good.clone();
        *m.pointer_mut(ptr).unwrap() = v.clone();
        std::fs::write(dir.join(MANIFEST), m.to_string()).unwrap();
        assert!(ImageIndex::load(&dir).is_err(), "{ptr} = {v}");
    }
}
