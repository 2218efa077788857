//! The image index on synthetic embeddings: the compact and approximate searches against the
//! exact scan (recall@10), and the index's life cycle (incremental segments, merging, deleted
//! photos, the format version, upgrading version 1, atomic saves) with a stand-in embedder.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clip_core::index::{
    Embedded, GraphParams, GraphPolicy, ImageIndex, IndexOptions, SearchMode, Segment, FORMAT_VERSION, MANIFEST,
    MAX_SEGMENTS,
};
use rand::{Rng, SeedableRng};

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn gaussian(rng: &mut impl Rng) -> f32 {
    // Box–Muller.
    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-9), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `n` L2-normalised rows around `clusters` centres (photos come in groups: a trip, a pet, a
/// document), each row about 0.7 cosine from its centre; and `queries` drawn the same way.
fn clustered(n: usize, queries: usize, dim: usize, clusters: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| gaussian(&mut rng)).collect();
            normalise(&mut c);
            c
        })
        .collect();
    let sigma = 1.0 / (dim as f32).sqrt();
    let point = |rng: &mut rand::rngs::StdRng| {
        let c = &centres[rng.random_range(0..clusters)];
        let mut v: Vec<f32> = c.iter().map(|x| x + sigma * gaussian(rng)).collect();
        normalise(&mut v);
        v
    };
    let rows = (0..n).flat_map(|_| point(&mut rng)).collect();
    let qs = (0..queries).map(|_| point(&mut rng)).collect();
    (rows, qs)
}

fn recall(found: &[(usize, f32)], truth: &[(usize, f32)]) -> f64 {
    let t: std::collections::HashSet<usize> = truth.iter().map(|x| x.0).collect();
    found.iter().filter(|x| t.contains(&x.0)).count() as f64 / truth.len() as f64
}

#[test]
fn compact_and_approximate_search_find_the_exact_top_10() {
    let (dim, k) = (64, 10);
    let (rows, queries) = clustered(30_000, 40, dim, 300, 1);
    let seg = Segment::new(1, dim, rows, Some(GraphParams::default()));
    assert!(seg.has_graph());
    let all = |_: usize| true;
    let (mut compact, mut approx) = (0.0, 0.0);
    for q in &queries {
        let exact = seg.search(q, k, SearchMode::Exact, &all);
        assert_eq!(exact.len(), k);
        let c = seg.search(q, k, SearchMode::Compact, &all);
        let a = seg.search(q, k, SearchMode::Approx, &all);
        compact += recall(&c, &exact);
        approx += recall(&a, &exact);
        // Re-ranking makes the scores exact: a row found by both has the same score.
        for (i, s) in c.iter().chain(&a) {
            if let Some((_, t)) = exact.iter().find(|(j, _)| j == i) {
                assert!((s - t).abs() < 1e-5, "row {i}: {s} vs exact {t}");
            }
        }
        assert!(c.windows(2).all(|w| w[0].1 >= w[1].1) && a.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    let n = queries.len() as f64;
    let (compact, approx) = (compact / n, approx / n);
    eprintln!("recall@10 against the exact scan: compact {compact:.4}, approximate {approx:.4}");
    assert!(compact >= 0.99, "compact recall@10 {compact}");
    assert!(approx >= 0.98, "approximate recall@10 {approx}");

    // Deleted rows are never returned, in any mode, and k live rows still come back.
    let even = |r: usize| r.is_multiple_of(2);
    for mode in [SearchMode::Exact, SearchMode::Compact, SearchMode::Approx] {
        let hits = seg.search(&queries[0], k, mode, &even);
        assert_eq!(hits.len(), k, "{mode:?}");
        assert!(hits.iter().all(|(r, _)| r.is_multiple_of(2)), "{mode:?}: {hits:?}");
    }
}

/// A large segment gets k-means lists, which answer the approximate search from a quarter of the
/// rows, survive a write and a read, and skip deleted rows.
#[test]
fn k_means_lists_find_the_exact_top_10_from_a_few_lists() {
    let (dim, k) = (32, 10);
    let n = clip_core::index::LISTS_MIN_ROWS;
    let (rows, queries) = clustered(n, 40, dim, 400, 2);
    let seg = Segment::new(3, dim, rows.clone(), None);
    assert!(seg.has_lists() && !seg.has_graph());
    let codes = clip_core::index::Int8Rows::from_f32(&rows, dim);
    let lists = clip_core::index::Lists::build(&rows, dim, &codes).unwrap();
    assert_eq!(lists.len(), clip_core::index::list_count(n));
    let probes = clip_core::index::default_probes(lists.len());
    assert!(
        probes * 3 < lists.len(),
        "{probes} of {} lists is not a few",
        lists.len()
    );
    // Every row is in exactly one list.
    let mut seen = lists.rows().to_vec();
    seen.sort_unstable();
    assert!(seen.iter().enumerate().all(|(i, &r)| r as usize == i));

    let dir = tempfile::tempdir().unwrap();
    seg.write(dir.path()).unwrap();
    let read = Segment::read(dir.path(), 3, dim, n, false).unwrap();
    assert!(read.has_lists());
    let all = |_: usize| true;
    let mut found = 0.0;
    for q in &queries {
        let exact = seg.search(q, k, SearchMode::Exact, &all);
        let a = seg.search(q, k, SearchMode::Approx, &all);
        assert_eq!(
            a,
            read.search(q, k, SearchMode::Approx, &all),
            "the lists changed on disk"
        );
        for (i, s) in &a {
            assert!((s - seg.search(q, 1, SearchMode::Exact, &|r| r == *i)[0].1).abs() < 1e-6);
        }
        found += recall(&a, &exact);
    }
    let found = found / queries.len() as f64;
    eprintln!(
        "recall@10 of the lists ({probes} of {} probed): {found:.4}",
        lists.len()
    );
    assert!(found >= 0.98, "recall@10 of the lists {found}");

    let even = |r: usize| r.is_multiple_of(2);
    let hits = seg.search(&queries[0], k, SearchMode::Approx, &even);
    assert_eq!(hits.len(), k);
    assert!(hits.iter().all(|(r, _)| r.is_multiple_of(2)), "{hits:?}");
}

/// A stand-in for the model: a file's embedding is a function of its name; `bad*` files fail.
fn fake_embed(dim: usize) -> impl Fn(&[PathBuf]) -> anyhow::Result<Embedded> {
    move |paths| {
        let mut rows = vec![];
        let (mut ok, mut failed) = (vec![], vec![]);
        for (i, p) in paths.iter().enumerate() {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("bad") {
                failed.push((i, "not an image".to_string()));
                continue;
            }
            rows.extend(name_vector(&name, dim));
            ok.push(i);
        }
        let t = (!ok.is_empty()).then(|| Tensor::from_vec(rows, (ok.len(), dim), &Device::Cpu).unwrap());
        Ok((t, ok, failed))
    }
}

fn name_vector(name: &str, dim: usize) -> Vec<f32> {
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v: Vec<f32> = (0..dim).map(|_| gaussian(&mut rng)).collect();
    normalise(&mut v);
    v
}

fn update(dir: &Path, photos: &Path, opts: &IndexOptions) -> (ImageIndex, clip_core::index::UpdateStats) {
    let previous = dir.join(MANIFEST).is_file().then(|| ImageIndex::load(dir).unwrap());
    let (mut idx, stats) = ImageIndex::update_with(previous, "model-a", 32, photos, opts, fake_embed(32)).unwrap();
    idx.save(dir).unwrap();
    (idx, stats)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn updates_append_segments_merge_them_and_survive_a_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(photos.join("sub")).unwrap();
    for f in ["a.jpg", "b.jpg", "sub/c.png", "bad.jpg"] {
        std::fs::write(photos.join(f), f).unwrap();
    }
    let opts = IndexOptions {
        graph: GraphPolicy::Always,
        ..IndexOptions::default()
    };
    let (idx, s) = update(&dir, &photos, &opts);
    assert_eq!((s.embedded, s.reused, s.failed.len(), s.segments), (3, 0, 1, 1));
    assert_eq!(idx.len(), 3);
    assert_eq!(
        files(&dir),
        ["manifest.json", "seg-000001.hnsw", "seg-000001.safetensors"]
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest["version"], FORMAT_VERSION);
    let first = std::fs::metadata(dir.join("seg-000001.safetensors"))
        .unwrap()
        .modified()
        .unwrap();

    // A new photo: only it is embedded, into a new segment; the first segment is not rewritten.
    std::fs::write(photos.join("d.jpg"), "d").unwrap();
    let (idx, s) = update(&dir, &photos, &opts);
    assert_eq!((s.embedded, s.reused, s.segments, s.merged), (1, 3, 2, 0));
    assert!(files(&dir).contains(&"seg-000002.safetensors".to_string()));
    assert_eq!(
        std::fs::metadata(dir.join("seg-000001.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        first
    );
    // Every mode finds each photo first by its own embedding, after a reload too.
    let idx2 = ImageIndex::load(&dir).unwrap();
    for (i, e) in idx.entries.iter().enumerate() {
        let q = name_vector(e.path.rsplit('/').next().unwrap(), 32);
        for mode in [SearchMode::Exact, SearchMode::Compact, SearchMode::Approx] {
            for index in [&idx, &idx2] {
                let hits = index.search_with(&q, 2, mode).unwrap();
                assert_eq!(hits[0].0, i, "{mode:?} {}", e.path);
                assert!((hits[0].1 - 1.0).abs() < 1e-5);
            }
        }
    }

    // Deleting half the photos: the dead rows pass 25 %, so everything is merged into one segment
    // and the old segments' files go.
    std::fs::remove_file(photos.join("a.jpg")).unwrap();
    std::fs::remove_file(photos.join("b.jpg")).unwrap();
    let (idx, s) = update(&dir, &photos, &opts);
    assert_eq!((s.removed, s.segments), (2, 1));
    assert_eq!(
        idx.entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        ["d.jpg", "sub/c.png"]
    );
    assert_eq!(
        files(&dir),
        ["manifest.json", "seg-000003.hnsw", "seg-000003.safetensors"]
    );

    // Many small updates never leave more than MAX_SEGMENTS segments.
    for n in 0..MAX_SEGMENTS + 3 {
        std::fs::write(photos.join(format!("new{n}.jpg")), format!("{n}")).unwrap();
        let (idx, s) = update(&dir, &photos, &opts);
        assert!(s.segments <= MAX_SEGMENTS, "{} segments", s.segments);
        assert_eq!(idx.len(), 3 + n);
        assert_eq!(s.embedded, 1);
    }
    let idx = ImageIndex::load(&dir).unwrap();
    let q = name_vector("new4.jpg", 32);
    assert_eq!(
        idx.entries[idx.search_with(&q, 1, SearchMode::Approx).unwrap()[0].0].path,
        "new4.jpg"
    );
    // Nothing temporary is left behind.
    assert!(files(&dir).iter().all(|f| !f.contains(".tmp")), "{:?}", files(&dir));

    // Another model's index is refused.
    let err = ImageIndex::update_with(Some(idx), "model-b", 32, &photos, &opts, fake_embed(32))
        .err()
        .unwrap();
    assert!(err.to_string().contains("another model"), "{err}");
}

#[test]
fn a_newer_format_is_refused_and_version_1_is_upgraded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join(MANIFEST),
        r#"{"version": 99, "fingerprint": "x", "root": "/", "dim": 4, "segments": [], "entries": []}"#,
    )
    .unwrap();
    let err = format!("{:#}", ImageIndex::load(dir).err().unwrap());
    assert!(err.contains("version 99") && err.contains("newer"), "{err}");

    // Version 1: a manifest without a version and one embeddings file.
    let rows = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let t = Tensor::from_vec(rows.to_vec(), (2, 4), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings".to_string(), t)]),
        dir.join("embeddings.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join(MANIFEST),
        r#"{"fingerprint": "x", "root": "/photos", "dim": 4, "entries": [
            {"path": "a.jpg", "size": 1, "modified": 2}, {"path": "b.jpg", "size": 3, "modified": 4}]}"#,
    )
    .unwrap();
    let mut idx = ImageIndex::load(dir).unwrap();
    assert_eq!(
        idx.search_with(&[0.0, 1.0, 0.0, 0.0], 1, SearchMode::Compact).unwrap()[0].0,
        1
    );
    idx.save(dir).unwrap();
    assert_eq!(files(dir), ["manifest.json", "seg-000001.safetensors"]);
    let idx = ImageIndex::load(dir).unwrap();
    assert_eq!(idx.entries[1].path, "b.jpg");
    assert_eq!(idx.embedding(1), &rows[4..]);

    // A damaged manifest is named.
    std::fs::write(dir.join(MANIFEST), "{").unwrap();
    let err = format!("{:#}", ImageIndex::load(dir).err().unwrap());
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn a_damaged_graph_is_dropped_with_a_warning_and_the_segment_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(&photos).unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("p{i:02}.jpg")).collect();
    for n in &names {
        std::fs::write(photos.join(n), n).unwrap();
    }
    let opts = IndexOptions {
        graph: GraphPolicy::Always,
        ..IndexOptions::default()
    };
    let (idx, _) = update(&dir, &photos, &opts);
    assert_eq!(idx.segment_counts().1, 1);
    let graph = dir.join("seg-000001.hnsw");
    let good = std::fs::read(&graph).unwrap();
    // Three ways to damage it: the last point's row number (the last 4 bytes) out of range, a
    // neighbour id of layer 0 out of range (its first node's first id, found by its value), and
    // a cut file.
    let mut bad_value = good.clone();
    let n = bad_value.len();
    bad_value[n - 4..].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
    let mut bad_neighbour = good.clone();
    // bincode: params (2 × u64), ef_search (u64), points (u64 count, then per point: u64 count,
    // 32 codes, f32 scale), then layer 0 (u64 count, then 64 ids per node).
    let zero = 24 + 8 + 40 * (8 + 32 + 4) + 8;
    bad_neighbour[zero..zero + 4].copy_from_slice(&7_000_000u32.to_le_bytes());
    let cut = good[..good.len() / 2].to_vec();
    for (what, bytes, why) in [
        ("a row number", bad_value, "names row"),
        ("a neighbour", bad_neighbour, "names a point that does not exist"),
        ("a cut file", cut, "reading the HNSW graph"),
    ] {
        std::fs::write(&graph, &bytes).unwrap();
        let idx = ImageIndex::load(&dir).unwrap();
        let warnings = idx.warnings();
        assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
        assert!(
            warnings[0].contains("seg-000001.hnsw") && warnings[0].contains(why) && warnings[0].contains("rebuild"),
            "{what}: {}",
            warnings[0]
        );
        assert_eq!(idx.segment_counts().1, 0, "{what}: the graph is not used");
        // Every photo is still found first by its own embedding, in every mode.
        for (i, e) in idx.entries.iter().enumerate() {
            let q = name_vector(&e.path, 32);
            for mode in [SearchMode::Exact, SearchMode::Compact, SearchMode::Approx] {
                assert_eq!(idx.search_with(&q, 3, mode).unwrap()[0].0, i, "{what} {mode:?}");
            }
        }
    }
    std::fs::write(&graph, &good).unwrap();
    let idx = ImageIndex::load(&dir).unwrap();
    assert!(idx.warnings().is_empty());
    assert_eq!(idx.segment_counts().1, 1);
}

/// A folder of `names` (each file holding its name) and a fresh index of it in `index/`.
fn indexed(tmp: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let (photos, dir) = (tmp.join("photos"), tmp.join("index"));
    std::fs::create_dir_all(&photos).unwrap();
    for n in names {
        std::fs::write(photos.join(n), n).unwrap();
    }
    update(&dir, &photos, &IndexOptions::default());
    (photos, dir)
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, m: &serde_json::Value) {
    std::fs::write(dir.join(MANIFEST), serde_json::to_string(m).unwrap()).unwrap();
}

/// Issue #32: an entry is a path inside the indexed folder; one that could name another file
/// (`..`, an absolute path, a non-image) or that no folder listing yields is refused when the
/// index is opened, naming it — in a version 2 manifest and in a version 1 one.
#[test]
fn entries_that_could_leave_the_indexed_folder_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = indexed(tmp.path(), &["a.jpg", "b.jpg"]);
    let good = manifest(&dir);
    assert!(ImageIndex::load(&dir).is_ok());
    for bad in [
        "../x.jpg",
        "/etc/passwd",
        "/etc/x.jpg",
        "a/../../b.jpg",
        "sub/../../../x.png",
        "etc/passwd",
        "a\\..\\b.jpg",
        "a\u{0}.jpg",
        "",
        "./a.jpg",
        "sub//a.jpg",
    ] {
        let mut m = good.clone();
        m["entries"][0]["path"] = bad.into();
        write_manifest(&dir, &m);
        let err = format!(
            "{:#}",
            ImageIndex::load(&dir)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"))
        );
        assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
    }
    // The same path twice is refused too.
    let mut m = good.clone();
    m["entries"][1]["path"] = "a.jpg".into();
    write_manifest(&dir, &m);
    let err = format!("{:#}", ImageIndex::load(&dir).err().unwrap());
    assert!(err.contains("\"a.jpg\"") && err.contains("twice"), "{err}");

    // Version 1, with the issue's root "/".
    let v1 = tmp.path().join("v1");
    std::fs::create_dir_all(&v1).unwrap();
    let t = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings".to_string(), t)]),
        v1.join("embeddings.safetensors"),
    )
    .unwrap();
    for (bad, ok) in [
        ("etc/passwd", false),
        ("../../etc/x.png", false),
        ("photos/a.png", true),
    ] {
        std::fs::write(
            v1.join(MANIFEST),
            format!(r#"{{"fingerprint": "x", "root": "/", "dim": 4, "entries": [{{"path": {bad:?}, "size": 1, "modified": 2}}]}}"#),
        )
        .unwrap();
        match ImageIndex::load(&v1) {
            Ok(_) => assert!(ok, "{bad:?} was accepted"),
            Err(e) => assert!(!ok && format!("{e:#}").contains(&format!("{bad:?}")), "{bad:?}: {e:#}"),
        }
    }
}

/// Issue #32: a relative `root` in a manifest is the indexed folder relative to the index
/// folder, never to the current directory; and a save records the root as an absolute path.
#[test]
fn a_relative_root_is_resolved_against_the_index_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = indexed(tmp.path(), &["a.jpg"]);
    let mut m = manifest(&dir);
    assert!(Path::new(m["root"].as_str().unwrap()).is_absolute(), "{m}");
    m["root"] = "../photos".into();
    write_manifest(&dir, &m);
    let idx = ImageIndex::load(&dir).unwrap();
    assert_eq!(idx.root, dir.join("../photos"));
    assert_eq!(idx.path_of(0), dir.join("../photos/a.jpg"));
    assert!(idx.path_of(0).is_file());

    let mut idx = ImageIndex::empty("x", Path::new("some/relative/photos"), 4);
    let out = tmp.path().join("empty-index");
    idx.save(&out).unwrap();
    assert_eq!(
        manifest(&out)["root"].as_str().unwrap(),
        std::path::absolute("some/relative/photos").unwrap().to_str().unwrap()
    );
}

fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Issue #32: a file replaced by one of the same size within the same second (in place, or by a
/// rename with the very same modification time) is embedded again, not reused.
#[test]
fn a_same_size_replacement_within_the_second_is_embedded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(&photos).unwrap();
    let a = photos.join("a.jpg");
    let second = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    std::fs::write(&a, "AAAA").unwrap();
    set_mtime(&a, second + std::time::Duration::from_millis(100));
    let opts = IndexOptions::default();
    let (_, s) = update(&dir, &photos, &opts);
    assert_eq!((s.embedded, s.reused), (1, 0));

    // Rewritten in place: same size, same whole second, other nanoseconds.
    std::fs::write(&a, "BBBB").unwrap();
    set_mtime(&a, second + std::time::Duration::from_millis(600));
    let (_, s) = update(&dir, &photos, &opts);
    assert_eq!(
        (s.embedded, s.reused),
        (1, 0),
        "the replacement was taken for the old file"
    );
    let (_, s) = update(&dir, &photos, &opts);
    assert_eq!((s.embedded, s.reused), (0, 1), "an unchanged file is reused");

    // Replaced by a rename, with the very same modification time: only the inode differs.
    #[cfg(unix)]
    {
        let b = photos.join("b.tmp");
        std::fs::write(&b, "CCCC").unwrap();
        set_mtime(&b, std::fs::metadata(&a).unwrap().modified().unwrap());
        std::fs::rename(&b, &a).unwrap();
        let (_, s) = update(&dir, &photos, &opts);
        assert_eq!(
            (s.embedded, s.reused),
            (1, 0),
            "the renamed replacement was taken for the old file"
        );
    }
}

/// Entries of manifests written before nanoseconds and inodes were recorded are compared on size
/// and whole seconds (not all embedded again on the first update), and then get both recorded.
#[test]
fn older_entries_are_reused_once_and_then_compared_to_the_nanosecond() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = indexed(tmp.path(), &["a.jpg", "b.jpg"]);
    let mut m = manifest(&dir);
    assert!(m["entries"][0]["modified_ns"].is_u64(), "{m}");
    for e in m["entries"].as_array_mut().unwrap() {
        let e = e.as_object_mut().unwrap();
        e.remove("modified_ns");
        e.remove("inode");
    }
    write_manifest(&dir, &m);
    let (_, s) = update(&dir, &photos, &IndexOptions::default());
    assert_eq!((s.embedded, s.reused), (0, 2));
    let m = manifest(&dir);
    assert!(m["entries"][1]["modified_ns"].is_u64(), "{m}");
    assert_eq!(m["version"], FORMAT_VERSION);
}

fn touch_all(dir: &Path, names: &[&str]) {
    for n in names {
        std::fs::write(dir.join(n), "the user's").unwrap();
    }
}

/// Issue #32: an index is written only into a folder of its own (new, empty, or holding an
/// index), and its cleanup removes only the files its manifests recorded: the user's files named
/// `seg-*` survive, in a refused folder and beside an index.
#[test]
fn an_index_writes_only_into_its_own_folder_and_removes_only_what_it_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for n in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] {
        std::fs::write(photos.join(n), n).unwrap();
    }
    let opts = IndexOptions::default();
    let (mut idx, _) = ImageIndex::update_with(None, "model-a", 32, &photos, &opts, fake_embed(32)).unwrap();

    // A folder of other files, one holding another tool's manifest.json (a run's checksums),
    // and a file: refused, and nothing in them touched.
    let victim = tmp.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    touch_all(
        &victim,
        &["seg-beach-2019.png", "seg-notes.txt", "seg-000001.safetensors"],
    );
    let err = format!("{:#}", idx.save(&victim).err().unwrap());
    assert!(err.contains("not empty") && err.contains("folder of its own"), "{err}");
    assert_eq!(
        files(&victim),
        ["seg-000001.safetensors", "seg-beach-2019.png", "seg-notes.txt"]
    );
    assert!(std::fs::read_to_string(victim.join("seg-000001.safetensors")).unwrap() == "the user's");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join(MANIFEST), r#"{"version": 2, "hash": "xxh3-128", "files": {}}"#).unwrap();
    touch_all(&run, &["seg-notes.txt"]);
    let err = format!("{:#}", idx.save(&run).err().unwrap());
    assert!(err.contains("not a readable image index"), "{err}");
    assert_eq!(files(&run), ["manifest.json", "seg-notes.txt"]);
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert!(idx.save(&file).is_err());
    assert!(ImageIndex::check_folder(&photos).is_err(), "the photos' own folder");

    // An empty folder is fine; the user's files put beside the index later survive every
    // update, while the segments its manifests recorded go once merged away.
    let dir = tmp.path().join("index");
    std::fs::create_dir_all(&dir).unwrap();
    idx.save(&dir).unwrap();
    touch_all(
        &dir,
        &["seg-notes.txt", "seg-000099.safetensors", "embeddings.safetensors"],
    );
    std::fs::write(photos.join("e.jpg"), "e").unwrap();
    let (_, s) = update(&dir, &photos, &opts);
    assert_eq!(s.segments, 2);
    for n in ["a.jpg", "b.jpg", "c.jpg"] {
        std::fs::remove_file(photos.join(n)).unwrap();
    }
    let (_, s) = update(&dir, &photos, &opts);
    assert_eq!((s.segments, s.removed), (1, 3));
    assert_eq!(
        files(&dir),
        [
            "embeddings.safetensors",
            "manifest.json",
            "seg-000003.safetensors",
            "seg-000099.safetensors",
            "seg-notes.txt"
        ]
    );
}

/// A manifest whose next segment number is the last one: the next update is an error, not an
/// overflow.
#[test]
fn an_index_out_of_segment_numbers_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, dir) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(photos.join("a.jpg"), "a").unwrap();
    std::fs::write(
        dir.join(MANIFEST),
        format!(
            r#"{{"version": 2, "fingerprint": "model-a", "root": "/", "dim": 32, "next_segment": {}, "segments": [], "entries": []}}"#,
            u32::MAX
        ),
    )
    .unwrap();
    let idx = ImageIndex::load(&dir).unwrap();
    let err = ImageIndex::update_with(
        Some(idx),
        "model-a",
        32,
        &photos,
        &IndexOptions::default(),
        fake_embed(32),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("segment number"), "{err}");
}
