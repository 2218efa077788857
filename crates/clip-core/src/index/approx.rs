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

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (params, map): (GraphParams, HnswMap<Code, u32>) =
            bincode::deserialize(bytes).context("reading the HNSW graph")?;
        Ok(Self { map, params })
    }
}
