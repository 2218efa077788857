//! A segment: a batch of embeddings added to an index in one update, stored in its own files and
//! never rewritten, so adding photos writes only the new ones.
//!
//! Each segment keeps the exact f32 embeddings (for exact scores and re-ranking), their int8
//! codes (the compact scan), from [`LISTS_MIN_ROWS`] rows on its k-means lists (stored beside the
//! codes; the approximate search), and, when asked for, an HNSW graph (the approximate search,
//! preferred where there is one).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};

use super::approx::{Graph, GraphParams};
use super::lists::{default_probes, Lists, LISTS_MIN_ROWS};
use super::quant::{dot_f32, rerank, Int8Rows};
use super::scan::{scan_top_k, TopK};
use crate::files::write_atomic;

/// How a query is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Every f32 embedding scored: the reference.
    Exact,
    /// The int8 scan, its best candidates re-scored exactly.
    Compact,
    /// The HNSW graph where a segment has one, else its k-means lists where it has them, else
    /// the compact scan; re-scored exactly.
    #[default]
    Approx,
}

impl std::str::FromStr for SearchMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "exact" => Self::Exact,
            "compact" => Self::Compact,
            "approx" => Self::Approx,
            _ => bail!("unknown search mode {s:?}: use exact, compact or approx"),
        })
    }
}

/// Candidates the compact scan re-ranks per query: enough that the exact top 10 is among them.
pub fn rerank_candidates(k: usize) -> usize {
    (4 * k).max(64)
}

pub struct Segment {
    /// Names its files: `seg-{id:06}.*`.
    pub id: u32,
    dim: usize,
    /// Row-major, L2-normalised.
    f32: Vec<f32>,
    codes: Int8Rows,
    lists: Option<Lists>,
    graph: Option<Graph>,
    /// Why this segment was read without a part of it (a damaged graph), for the index's owner.
    warning: Option<String>,
}

impl Segment {
    /// A new segment of `f32` rows; with `graph`, its HNSW graph is built too.
    pub fn new(id: u32, dim: usize, f32: Vec<f32>, graph: Option<GraphParams>) -> Self {
        let codes = Int8Rows::from_f32(&f32, dim);
        let graph = graph.filter(|_| codes.len() > 1).map(|p| Graph::build(&codes, p));
        // Only a CPU matrix product of checked shapes can fail here; without lists the segment
        // is still searched (by the int8 scan).
        let lists = (codes.len() >= LISTS_MIN_ROWS)
            .then(|| Lists::build(&f32, dim, &codes).ok())
            .flatten();
        Self {
            id,
            dim,
            f32,
            codes,
            lists,
            graph,
            warning: None,
        }
    }

    /// Builds this segment's HNSW graph (for a segment that had none).
    pub fn add_graph(&mut self, params: GraphParams) {
        if self.codes.len() > 1 {
            self.graph = Some(Graph::build(&self.codes, params));
        }
    }

    pub fn rows(&self) -> usize {
        self.codes.len()
    }

    pub fn has_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// Why this segment was read without a part of it (a damaged graph), if it was.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// Whether it has k-means lists (segments of [`LISTS_MIN_ROWS`] rows or more).
    pub fn has_lists(&self) -> bool {
        self.lists.is_some()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.f32[i * self.dim..(i + 1) * self.dim]
    }

    /// The best `k` rows for which `keep` holds, best first, with exact cosine scores.
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        mode: SearchMode,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<(usize, f32)> {
        let exact = |i: usize| dot_f32(self.row(i), q);
        match (mode, &self.graph, &self.lists) {
            (SearchMode::Exact, _, _) => {
                // The scan keeps the best k + (deleted rows) so deleted ones cannot crowd out k live.
                let dead = (0..self.rows()).filter(|&i| !keep(i)).count();
                let mut top = TopK::new(k);
                for (i, s) in scan_top_k(&self.f32, self.dim, q, k + dead) {
                    if keep(i) {
                        top.push(i, s);
                    }
                }
                top.into_sorted()
            }
            (SearchMode::Approx, Some(g), _) if k <= g.params().ef_search / 2 => {
                rerank(g.search(q).into_iter().filter(|&i| keep(i)), k, exact)
            }
            (SearchMode::Approx, _, Some(l)) => {
                let rough = l.search(q, rerank_candidates(k), default_probes(l.len()), keep);
                rerank(rough.into_iter().map(|(i, _)| i), k, exact)
            }
            _ => self.codes.search(q, k, rerank_candidates(k), keep, exact),
        }
    }

    fn file(dir: &Path, id: u32, ext: &str) -> PathBuf {
        dir.join(format!("seg-{id:06}.{ext}"))
    }

    /// The file names this segment occupies in its index folder.
    pub fn file_names(&self) -> Vec<String> {
        let mut v = Self::file_names_of(self.id);
        if self.graph.is_none() {
            v.pop();
        }
        v
    }

    /// Every file name segment `id` may occupy: its embeddings, then its graph. They are made
    /// from the number alone, so a manifest cannot name a file outside its folder.
    pub fn file_names_of(id: u32) -> Vec<String> {
        vec![format!("seg-{id:06}.safetensors"), format!("seg-{id:06}.hnsw")]
    }

    /// Writes the segment's files (each atomically: a temporary file, then a rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let f32_bytes: Vec<u8> = self.f32.iter().flat_map(|x| x.to_le_bytes()).collect();
        let code_bytes: Vec<u8> = self.codes.codes().iter().map(|&c| c as u8).collect();
        let scale_bytes: Vec<u8> = self.codes.scales().iter().flat_map(|x| x.to_le_bytes()).collect();
        let (n, d) = (self.rows(), self.dim);
        let u32_bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (centroid_bytes, offset_bytes, list_row_bytes) = match &self.lists {
            Some(l) => (
                l.centroids().iter().flat_map(|x| x.to_le_bytes()).collect(),
                u32_bytes(l.offsets()),
                u32_bytes(l.rows()),
            ),
            None => (vec![], vec![], vec![]),
        };
        let mut views = vec![
            (
                "f32",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![n, d], &f32_bytes)?,
            ),
            (
                "i8",
                safetensors::tensor::TensorView::new(Dtype::I8, vec![n, d], &code_bytes)?,
            ),
            (
                "scale",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![n], &scale_bytes)?,
            ),
        ];
        if let Some(l) = &self.lists {
            views.push((
                "lists_centroids",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![l.len(), d], &centroid_bytes)?,
            ));
            views.push((
                "lists_offsets",
                safetensors::tensor::TensorView::new(Dtype::U32, vec![l.len() + 1], &offset_bytes)?,
            ));
            views.push((
                "lists_rows",
                safetensors::tensor::TensorView::new(Dtype::U32, vec![n], &list_row_bytes)?,
            ));
        }
        let bytes = safetensors::serialize(views.iter().map(|(k, v)| (*k, v.clone())), None)?;
        write_atomic(&Self::file(dir, self.id, "safetensors"), &bytes)?;
        if let Some(g) = &self.graph {
            write_atomic(&Self::file(dir, self.id, "hnsw"), &g.to_bytes()?)?;
        }
        Ok(())
    }

    /// Reads segment `id` of `rows` rows of `dim` from `dir`.
    pub fn read(dir: &Path, id: u32, dim: usize, rows: usize, graph: bool) -> Result<Self> {
        let path = Self::file(dir, id, "safetensors");
        let bytes = std::fs::read(&path).with_context(|| format!("reading index segment {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        let get = |name: &str, dtype: Dtype, shape: &[usize]| tensor_bytes(&st, &path, name, dtype, shape);
        let f32 = le_f32(get("f32", Dtype::F32, &[rows, dim])?);
        let codes: Vec<i8> = get("i8", Dtype::I8, &[rows, dim])?
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let scales = le_f32(get("scale", Dtype::F32, &[rows])?);
        let codes = Int8Rows::from_parts(dim, codes, scales)
            .with_context(|| format!("{}: codes and scales disagree", path.display()))?;
        // Lists are optional tensors: segments written before them (or small ones) have none.
        let lists =
            match st.tensor("lists_centroids") {
                Err(_) => None,
                Ok(c) => {
                    let lists = c.shape().first().copied().unwrap_or(0);
                    let centroids = le_f32(get("lists_centroids", Dtype::F32, &[lists, dim])?);
                    let offsets = le_u32(get("lists_offsets", Dtype::U32, &[lists + 1])?);
                    let order = le_u32(get("lists_rows", Dtype::U32, &[rows])?);
                    Some(Lists::from_parts(centroids, offsets, order, &codes).with_context(|| {
                        format!("{}: its k-means lists are damaged; rebuild the index", path.display())
                    })?)
                }
            };
        let (graph, warning) = if graph {
            Self::read_graph(dir, id, rows, dim)
        } else {
            (None, None)
        };
        Ok(Self {
            warning,
            id,
            dim,
            f32,
            codes,
            lists,
            graph,
        })
    }

    /// Segment `id`'s graph, or the warning to show in its place. A graph is only a shortcut:
    /// one that cannot be read, or fails its checks, is dropped with a warning and the segment is
    /// searched by its lists or the scan.
    fn read_graph(dir: &Path, id: u32, rows: usize, dim: usize) -> (Option<Graph>, Option<String>) {
        let gpath = Self::file(dir, id, "hnsw");
        let read = std::fs::read(&gpath)
            .with_context(|| format!("reading index graph {}", gpath.display()))
            .and_then(|b| Graph::from_bytes(&b, rows, dim).with_context(|| format!("in {}", gpath.display())));
        match read {
            Ok(g) => (Some(g), None),
            Err(e) => (
                None,
                Some(format!(
                    "{e:#}: this segment is searched without its graph (exactly, or by its k-means lists); rebuild the index to restore it"
                )),
            ),
        }
    }
}

/// The bytes of tensor `name` of the segment file at `path`, checked to be `dtype` of `shape`:
/// a damaged index is an error naming the file, never a misread.
fn tensor_bytes(st: &SafeTensors, path: &Path, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Vec<u8>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{} has no `{name}` tensor", path.display()))?;
    if t.dtype() != dtype || t.shape() != shape {
        bail!(
            "{}: `{name}` is {:?} {:?}, expected {dtype:?} {shape:?} — the index is damaged; rebuild it",
            path.display(),
            t.dtype(),
            t.shape()
        );
    }
    Ok(t.data().to_vec())
}

/// Little-endian f32s from their bytes.
fn le_f32(b: Vec<u8>) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian u32s from their bytes.
fn le_u32(b: Vec<u8>) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
