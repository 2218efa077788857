//! The approximate index: an HNSW graph (the `instant-distance` crate) over the int8 codes.
//!
//! A graph search visits a few thousand vectors instead of all of them, so a query over millions
//! of photos takes about a millisecond. Distances inside the graph use the int8 codes (a quarter
//! of the memory traffic); the candidates it returns are re-scored exactly by the caller. A graph
//! is built once per index segment and never changed, which keeps updates incremental: new photos
//! go into a new segment (see [`super::segment`]).

use anyhow::{Context, Result};
use instant_distance::{Builder, HnswMap, Search};
use serde::{Deserialize, Serialize};

use super::quant::{dot_i8, quantize, Int8Rows};

/// One point of the graph: a row's int8 codes and scale.
#[derive(Clone, Serialize, Deserialize)]
pub struct Code {
    codes: Vec<i8>,
    scale: f32,
}

impl instant_distance::Point for Code {
    /// 1 − cosine (the rows are L2-normalised), from the codes.
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot_i8(&self.codes, &other.codes) as f32 * self.scale * other.scale
    }
}

/// How much work building and searching a graph does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct GraphParams {
    /// Candidates kept while inserting a point (more: a better graph, a slower build).
    pub ef_construction: usize,
    /// Candidates kept while searching; also the most results one graph search returns.
    pub ef_search: usize,
}

impl Default for GraphParams {
    /// Chosen on clustered synthetic embeddings (20,000 × 256, `bench_search`): ef_search 160
    /// gave recall@10 0.955 after re-ranking, 400 gave 0.985; raising ef_construction from 64 to
    /// 128 doubled the build time without helping. Re-ranking 512 candidates exactly costs ~0.1 ms.
    fn default() -> Self {
        Self {
            ef_construction: 64,
            ef_search: 512,
        }
    }
}

/// An HNSW graph over the rows of one segment; its values are the row numbers.
pub struct Graph {
    map: HnswMap<Code, u32>,
    params: GraphParams,
}

impl Graph {
    /// Builds the graph of every row (in parallel).
    pub fn build(rows: &Int8Rows, params: GraphParams) -> Self {
        let points: Vec<Code> = (0..rows.len())
            .map(|i| {
                let (c, s) = rows.row(i);
                Code {
                    codes: c.to_vec(),
                    scale: s,
                }
            })
            .collect();
        let values: Vec<u32> = (0..rows.len() as u32).collect();
        let map = Builder::default()
            .ef_construction(params.ef_construction)
            .ef_search(params.ef_search)
            // The neighbour-selection heuristic re-scores every neighbour list a new point joins
            // (~64² distances each): it made building 20,000 rows take minutes on two cores, for
            // little recall on embeddings once the candidates are re-ranked exactly.
            .select_heuristic(None)
            .seed(0x5eed)
            .build(points, values);
        Self { map, params }
    }

    pub fn params(&self) -> GraphParams {
        self.params
    }

    /// Up to `ef_search` rows near `q`, nearest first.
    pub fn search(&self, q: &[f32]) -> Vec<usize> {
        let mut codes = vec![0i8; q.len()];
        let scale = quantize(q, &mut codes);
        let point = Code { codes, scale };
        let mut search = Search::default();
        self.map
            .search(&point, &mut search)
            .map(|item| *item.value as usize)
            .collect()
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        bincode::serialize(&(&self.params, &self.map)).context("serialising the HNSW graph")
    }

    /// Reads a graph written by [`Graph::to_bytes`] for a segment of `rows` rows of `dim`, checking
    /// every id in it first: the search follows neighbour ids and returns row numbers unchecked,
    /// so a damaged file would otherwise panic (or read another row) at query time.
    pub fn from_bytes(bytes: &[u8], rows: usize, dim: usize) -> Result<Self> {
        let raw: (GraphParams, RawMap) = bincode::deserialize(bytes).context("reading the HNSW graph")?;
        raw.1.check(rows, dim).context("the HNSW graph is damaged")?;
        let (params, map): (GraphParams, HnswMap<Code, u32>) =
            bincode::deserialize(bytes).context("reading the HNSW graph")?;
        Ok(Self { map, params })
    }
}

/// `instant_distance::HnswMap<Code, u32>` as bincode lays it out (its fields are private), read
/// only to check it: the points, the neighbour lists of layer 0 (64 ids a node) and of the
/// upper layers (32 ids a node, `u32::MAX` for none), and each point's value (our row number).
#[derive(Deserialize)]
struct RawMap {
    hnsw: RawHnsw,
    values: Vec<u32>,
}

#[derive(Deserialize)]
struct RawHnsw {
    #[allow(dead_code)]
    ef_search: usize,
    points: Vec<Code>,
    zero: Vec<([u32; 32], [u32; 32])>,
    layers: Vec<Vec<[u32; 32]>>,
}

impl RawMap {
    fn check(&self, rows: usize, dim: usize) -> Result<()> {
        let h = &self.hnsw;
        let n = h.points.len();
        if n != rows || h.zero.len() != n || self.values.len() != n {
            anyhow::bail!(
                "it has {n} points, {} layer-0 nodes and {} values for a segment of {rows} rows",
                h.zero.len(),
                self.values.len()
            );
        }
        if let Some(p) = h
            .points
            .iter()
            .position(|p| p.codes.len() != dim || !p.scale.is_finite())
        {
            anyhow::bail!("point {p} does not hold {dim} codes and a finite scale");
        }
        if let Some(v) = self.values.iter().find(|&&v| v as usize >= rows) {
            anyhow::bail!("it names row {v} of a segment of {rows} rows");
        }
        let ok = |id: u32, len: usize| id == u32::MAX || (id as usize) < len;
        if let Some(i) = h.zero.iter().position(|(a, b)| !a.iter().chain(b).all(|&id| ok(id, n))) {
            anyhow::bail!("node {i} of layer 0 names a point that does not exist");
        }
        // The search starts at point 0 of the top layer and carries its candidates down, so each
        // layer must hold every node of the one above it (layers[0] is layer 1, the largest).
        let mut below = n;
        for (l, layer) in h.layers.iter().enumerate() {
            if layer.len() > below || layer.is_empty() {
                anyhow::bail!(
                    "upper layer {} has {} nodes (the layer below has {below})",
                    l + 1,
                    layer.len()
                );
            }
            below = layer.len();
            if let Some(i) = layer
                .iter()
                .position(|node| !node.iter().all(|&id| ok(id, layer.len())))
            {
                anyhow::bail!("node {i} of upper layer {} names a node that does not exist", l + 1);
            }
        }
        Ok(())
    }
}
