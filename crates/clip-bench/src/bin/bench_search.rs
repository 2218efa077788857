//! `cargo xtask bench search` (or `cargo run -p clip-bench --bin bench_search -- --help`):
//! the exact f32 scan against the compact (int8 + exact re-rank) and approximate (HNSW +
//! exact re-rank) searches, on synthetic clustered embeddings, in one run. Prints JSON lines:
//! per method the median and 90th-percentile query time, its speed-up over the exact scan of
//! the same run, recall@K against the exact scan, and build time.
//!
//! At `--big` rows (default 10,000,000) the f32 matrix would not fit beside everything else
//! (10M × 256 × 4 B = 10 GB), so rows are generated from their number (each row is a function of
//! its index), quantised chunk by chunk, and the exact answers are computed from the same
//! generated chunks (as one matrix product per chunk); only the int8 codes (2.5 GB) are kept, and re-ranking regenerates the few
//! candidate rows. No HNSW graph is built at that size (hours on two cores).

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Parser;
use clip_core::index::{
    default_probes, dot_f32, list_count, rerank, rerank_candidates, scan_top_k, Graph, GraphParams, Int8Rows, Lists,
    TopK,
};
use rayon::prelude::*;
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// Rows of the main comparison (exact vs compact vs approximate).
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    /// Rows of the large run (compact only); 0 skips it.
    #[arg(long, default_value_t = 10_000_000)]
    big: usize,
    #[arg(long, default_value_t = 256)]
    dim: usize,
    #[arg(long, default_value_t = 50)]
    queries: usize,
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Groups of similar photos in the synthetic library.
    #[arg(long, default_value_t = 5000)]
    clusters: usize,
    #[arg(long, default_value_t = GraphParams::default().ef_construction)]
    ef_construction: usize,
    #[arg(long, default_value_t = GraphParams::default().ef_search)]
    ef_search: usize,
    /// Skip the HNSW graph.
    #[arg(long)]
    no_graph: bool,
    /// Lists probed per query by the k-means lists search, besides the default; repeatable.
    #[arg(long)]
    probes: Vec<usize>,
}

/// SplitMix64: a row's numbers depend only on (seed, row), so any row can be regenerated.
struct Mix(u64);

impl Mix {
    fn new(seed: u64, i: u64) -> Self {
        let mut m = Mix(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        m.next();
        m
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [−√3, √3): mean 0, variance 1.
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1.732_050_8
    }
}

struct Library {
    dim: usize,
    centres: Vec<f32>,
    seed: u64,
}

impl Library {
    fn new(dim: usize, clusters: usize, seed: u64) -> Self {
        let mut centres = vec![0f32; dim * clusters];
        for (c, row) in centres.chunks_mut(dim).enumerate() {
            let mut m = Mix::new(seed ^ 0xc0ffee, c as u64);
            row.iter_mut().for_each(|x| *x = m.unit());
            normalise(row);
        }
        Self { dim, centres, seed }
    }

    /// Row `i`: a cluster centre plus noise (≈0.7 cosine to it), L2-normalised.
    fn row(&self, i: u64, out: &mut [f32]) {
        let mut m = Mix::new(self.seed, i);
        let clusters = self.centres.len() / self.dim;
        let c = (m.next() % clusters as u64) as usize;
        let sigma = 1.0 / (self.dim as f32).sqrt();
        for (o, x) in out.iter_mut().zip(&self.centres[c * self.dim..(c + 1) * self.dim]) {
            *o = x + sigma * m.unit();
        }
        normalise(out);
    }

    fn rows(&self, from: usize, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n * self.dim];
        v.par_chunks_mut(self.dim)
            .enumerate()
            .for_each(|(r, out)| self.row((from + r) as u64, out));
        v
    }
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn recall(found: &[(usize, f32)], truth: &[(usize, f32)]) -> f64 {
    found.iter().filter(|f| truth.iter().any(|t| t.0 == f.0)).count() as f64 / truth.len().max(1) as f64
}

/// (median, 90th percentile) in ms.
fn stats(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ms[ms.len() / 2], ms[(ms.len() * 9 / 10).min(ms.len() - 1)])
}

/// One probe count's result of [`time_lists`].
struct ListsRun {
    probes: usize,
    default: bool,
    median_ms: f64,
    p90_ms: f64,
    recall: f64,
}

/// Times the lists search with the default probe count, then each of `extra`; `exact(row, q)`
/// re-scores a candidate.
fn time_lists(
    lists: &Lists,
    queries: &[Vec<f32>],
    truth: &[Vec<(usize, f32)>],
    k: usize,
    extra: &[usize],
    exact: &mut dyn FnMut(usize, &[f32]) -> f32,
) -> Vec<ListsRun> {
    let default = default_probes(lists.len());
    let probes = std::iter::once(default).chain(extra.iter().copied().filter(|&p| p != default));
    probes
        .map(|p| {
            let (mut ms, mut rec) = (vec![], 0.0);
            for (q, tr) in queries.iter().zip(truth) {
                let t = Instant::now();
                let rough = lists.search(q, rerank_candidates(k), p, &|_| true);
                let hits = rerank(rough.into_iter().map(|(i, _)| i), k, |i| exact(i, q));
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                rec += recall(&hits, tr);
            }
            let (median_ms, p90_ms) = stats(ms);
            ListsRun {
                probes: p,
                default: p == default,
                median_ms,
                p90_ms,
                recall: rec / queries.len() as f64,
            }
        })
        .collect()
}

/// Times `search` over every query: (median ms, 90th percentile ms, mean recall against `truth`).
fn time_queries(
    queries: &[Vec<f32>],
    truth: &[Vec<(usize, f32)>],
    mut search: impl FnMut(&[f32]) -> Vec<(usize, f32)>,
) -> (f64, f64, f64) {
    let (mut ms, mut rec) = (vec![], 0.0);
    for (q, tr) in queries.iter().zip(truth) {
        let t = Instant::now();
        let hits = search(q);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        rec += recall(&hits, tr);
    }
    let (med, p90) = stats(ms);
    (med, p90, rec / queries.len() as f64)
}

fn main() -> Result<()> {
    // As the programs run: freed memory reused (clip_cli::memory).
    clip_cli::memory::keep_freed_memory();
    let cli = Cli::parse();
    let dim = cli.dim;
    let lib = Library::new(dim, cli.clusters, 7);
    // Queries come from the same library (a caption lands near a group of photos), numbered
    // past every stored row.
    let queries: Vec<Vec<f32>> = (0..cli.queries)
        .map(|q| {
            let mut v = vec![0f32; dim];
            lib.row(u64::MAX / 2 + q as u64, &mut v);
            v
        })
        .collect();
    let common = json!({"bench": "search", "dim": dim, "top": cli.top, "queries": cli.queries, "clusters": cli.clusters,
                        "threads": rayon::current_num_threads()});
    let line = |extra: serde_json::Value| {
        let mut v = common.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        println!("{v}");
    };

    if cli.n > 0 {
        in_memory(&cli, &lib, &queries, &line)?;
    }
    if cli.big > 0 {
        big(&cli, &lib, &queries, &line)?;
    }
    Ok(())
}

/// `--n` rows held in memory: the exact f32 scan, the int8 scan, the k-means lists and (unless
/// `--no-graph`) the HNSW graph, each a `line`.
fn in_memory(cli: &Cli, lib: &Library, queries: &[Vec<f32>], line: &dyn Fn(serde_json::Value)) -> Result<()> {
    let (n, dim, k) = (cli.n, cli.dim, cli.top);
    let t = Instant::now();
    let data = lib.rows(0, n);
    let gen_s = t.elapsed().as_secs_f64();
    let mut truth = vec![];
    let mut exact_ms = vec![];
    for q in queries {
        let t = Instant::now();
        truth.push(scan_top_k(&data, dim, q, k));
        exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (exact_med, exact_p90) = stats(exact_ms);
    line(
        json!({"embeddings": n, "method": "exact-f32-scan", "median_ms": exact_med, "p90_ms": exact_p90,
                "recall_at_k": 1.0, "speedup": 1.0, "bytes_per_vector": dim * 4, "generate_s": gen_s}),
    );

    let t = Instant::now();
    let codes = Int8Rows::from_f32(&data, dim);
    let build_s = t.elapsed().as_secs_f64();
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let (med, p90, rec) = time_queries(queries, &truth, |q| {
        codes.search(q, k, rerank_candidates(k), &|_| true, |i| dot_f32(row(i), q))
    });
    line(
        json!({"embeddings": n, "method": "compact-int8+rerank", "median_ms": med, "p90_ms": p90,
                "recall_at_k": rec, "speedup": exact_med / med, "build_s": build_s,
                "rerank_candidates": rerank_candidates(k), "bytes_per_vector": dim + 4}),
    );

    let t = Instant::now();
    let lists = Lists::build(&data, dim, &codes)?;
    let build_s = t.elapsed().as_secs_f64();
    for r in time_lists(&lists, queries, &truth, k, &cli.probes, &mut |i, q| dot_f32(row(i), q)) {
        line(
            json!({"embeddings": n, "method": "approx-lists+rerank", "median_ms": r.median_ms, "p90_ms": r.p90_ms,
                    "recall_at_k": r.recall, "speedup": exact_med / r.median_ms, "build_s": build_s,
                    "lists": lists.len(), "probes": r.probes, "default_probes": r.default}),
        );
    }

    if !cli.no_graph {
        let params = GraphParams {
            ef_construction: cli.ef_construction,
            ef_search: cli.ef_search,
        };
        let t = Instant::now();
        let graph = Graph::build(&codes, params);
        let build_s = t.elapsed().as_secs_f64();
        let (med, p90, rec) = time_queries(queries, &truth, |q| rerank(graph.search(q), k, |i| dot_f32(row(i), q)));
        line(
            json!({"embeddings": n, "method": "approx-hnsw+rerank", "median_ms": med, "p90_ms": p90,
                    "recall_at_k": rec, "speedup": exact_med / med, "build_s": build_s,
                    "ef_construction": params.ef_construction, "ef_search": params.ef_search}),
        );
    }
    Ok(())
}

/// The `--big` library, never held as f32: its int8 codes, each query's exact answers, and its
/// k-means lists (centroids, each row's list, and the seconds they took).
struct BigLibrary {
    codes: Int8Rows,
    truth: Vec<Vec<(usize, f32)>>,
    centroids: Vec<f32>,
    assignment: Vec<u32>,
    lists_s: f64,
}

/// Generates `n` rows of `lib` a chunk at a time: each chunk quantised, assigned to its list,
/// and scored exactly against every query, then dropped.
fn generate_big(lib: &Library, n: usize, dim: usize, queries: &[Vec<f32>], k: usize) -> Result<BigLibrary> {
    const CHUNK: usize = 1_000_000;
    let mut codes = Int8Rows::new(dim);
    let mut truth: Vec<TopK> = queries.iter().map(|_| TopK::new(k)).collect();
    let qt = Tensor::from_vec(queries.concat(), (queries.len(), dim), &Device::Cpu)?
        .t()?
        .contiguous()?;
    // k-means lists: centroids from an evenly spaced sample of the rows, every row assigned
    // as its chunk is generated.
    let lists_t = Instant::now();
    let n_lists = list_count(n);
    let sample_n = (n_lists * 32).min(n);
    let mut sample = vec![0f32; sample_n * dim];
    for (i, out) in sample.chunks_exact_mut(dim).enumerate() {
        lib.row((i * n / sample_n) as u64, out);
    }
    let centroids = clip_core::index::train_centroids(&sample, dim, n_lists)?;
    drop(sample);
    let mut lists_s = lists_t.elapsed().as_secs_f64();
    let mut assignment: Vec<u32> = Vec::with_capacity(n);
    let mut from = 0;
    while from < n {
        let rows = CHUNK.min(n - from);
        let chunk = lib.rows(from, rows);
        codes.append(&Int8Rows::from_f32(&chunk, dim));
        let t = Instant::now();
        for part in chunk.chunks(16_384 * dim) {
            assignment.extend(clip_core::index::assign(&centroids, dim, part)?);
        }
        lists_s += t.elapsed().as_secs_f64();
        // The exact scores of every query at once, as one matrix product (the chunk is read
        // once instead of once per query).
        let m = Tensor::from_vec(chunk, (rows, dim), &Device::Cpu)?;
        let scores = m.matmul(&qt)?.t()?.contiguous()?.to_vec2::<f32>()?;
        for (col, top) in scores.iter().zip(truth.iter_mut()) {
            for (i, &s) in col.iter().enumerate() {
                top.push(from + i, s);
            }
        }
        from += rows;
    }
    let truth: Vec<Vec<(usize, f32)>> = truth.into_iter().map(TopK::into_sorted).collect();
    Ok(BigLibrary {
        codes,
        truth,
        centroids,
        assignment,
        lists_s,
    })
}

/// `--big` rows, more than memory holds as f32: the int8 scan and the k-means lists, each
/// candidate re-scored from its regenerated row.
fn big(cli: &Cli, lib: &Library, queries: &[Vec<f32>], line: &dyn Fn(serde_json::Value)) -> Result<()> {
    let (n, dim, k) = (cli.big, cli.dim, cli.top);
    let t = Instant::now();
    let BigLibrary {
        codes,
        truth,
        centroids,
        assignment,
        lists_s,
    } = generate_big(lib, n, dim, queries, k)?;
    let build_s = t.elapsed().as_secs_f64();
    let mut buf = vec![0f32; dim];
    let (med, p90, rec) = time_queries(queries, &truth, |q| {
        codes.search(q, k, rerank_candidates(k), &|_| true, |i| {
            lib.row(i as u64, &mut buf);
            dot_f32(&buf, q)
        })
    });
    line(
        json!({"embeddings": n, "method": "compact-int8+rerank", "median_ms": med, "p90_ms": p90,
                "recall_at_k": rec, "generate_and_quantise_s": build_s,
                "note": "f32 rows not held (10 GB); exact answers from the same generated rows; no graph at this size"}),
    );
    let lists = Lists::from_assignment(dim, centroids, &assignment, &codes);
    drop(assignment);
    let mut exact = |i: usize, q: &[f32]| {
        lib.row(i as u64, &mut buf);
        dot_f32(&buf, q)
    };
    for r in time_lists(&lists, queries, &truth, k, &cli.probes, &mut exact) {
        line(
            json!({"embeddings": n, "method": "approx-lists+rerank", "median_ms": r.median_ms, "p90_ms": r.p90_ms,
                    "recall_at_k": r.recall, "build_s": lists_s,
                    "lists": lists.len(), "probes": r.probes, "default_probes": r.default}),
        );
    }
    Ok(())
}
