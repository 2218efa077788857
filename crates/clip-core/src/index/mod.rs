//! An image index: L2-normalised embeddings of every image under a folder, searchable by a
//! caption or an image, and updated incrementally (only new or changed files are embedded).
//!
//! Three ways to answer a query ([`SearchMode`]): the exact f32 scan (the reference), the compact
//! int8 scan re-ranked exactly ([`quant`]), and the approximate search for collections of
//! millions: k-means lists ([`lists`], built for every large segment: seconds) or an HNSW graph
//! ([`approx`], on request: hours at a million photos on two cores). Embeddings live in append-only [`segment`]s: an update writes one new segment for
//! the new photos, and merges segments only when there are many or many rows were deleted.
//!
//! An index folder (format version [`FORMAT_VERSION`]) holds `manifest.json` (the version, the
//! model's fingerprint, the folder, the segments, and each file's segment and row) and per
//! segment `seg-NNNNNN.safetensors` (f32 rows, int8 codes, scales, and for large segments their
//! k-means lists, optional tensors older readers skip) and, when it has a graph,
//! `seg-NNNNNN.hnsw`. Every file is written to a temporary file and renamed, the manifest last,
//! so an interrupted update leaves the previous index readable. Version 1 indexes (one
//! `embeddings.safetensors`) are upgraded when loaded; a newer version is refused by name.
//!
//! The folder's manifest is read and written in `manifest`, an update's plan (reuse, embed,
//! drop, merge) is `update`'s; the segments' storage and search are below.

mod approx;
mod files;
mod lists;
mod manifest;
mod quant;
mod scan;
mod segment;
mod update;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use approx::{Graph, GraphParams};
pub use files::{embed_image_files, files_fingerprint, list_images, model_fingerprint, stat as stat_entry, Embedded};
pub use lists::{assign, default_probes, list_count, train_centroids, Lists, LISTS_MIN_ROWS};
pub use quant::{dot_f32, dot_i8, quantize, rerank, Int8Rows};
pub use scan::{scan_top_k, select, top_k, TopK};
pub use segment::{rerank_candidates, SearchMode, Segment};

/// The index format this build writes; it reads this one and upgrades version 1.
pub const FORMAT_VERSION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";
/// Version 1's single embeddings file, read only to upgrade.
pub const EMBEDDINGS_V1: &str = "embeddings.safetensors";
/// Under [`GraphPolicy::Auto`], segments of at least this many photos (and fewer than
/// [`LISTS_MIN_ROWS`], which get k-means lists instead) get an HNSW graph: below it the int8 scan
/// answers in about a millisecond and a graph is not worth building.
pub const AUTO_GRAPH_ROWS: usize = 20_000;
/// An update leaving more segments than this merges all but the largest into one.
pub const MAX_SEGMENTS: usize = 8;
/// An update leaving more than this share of stored rows deleted merges every segment.
pub const MAX_DEAD_SHARE: f64 = 0.25;

/// Marks a stored row whose photo was deleted or changed.
const DEAD: u32 = u32::MAX;

/// One indexed file: where it is and what it was when embedded.
///
/// A file is reused by an update when its size, modification time (to the nanosecond) and, on
/// Unix, inode are what they were. Entries written before the nanoseconds and the inode were
/// recorded (they are absent) are compared on size and whole seconds once; reusing them records
/// both, so from the next update on they are compared fully.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    /// Path relative to the indexed folder: `/`-separated names, none empty, `.` or `..`, no
    /// backslash or NUL, ending in an image extension (see [`check_entry_path`]).
    pub path: String,
    pub size: u64,
    /// Whole seconds since 1970.
    pub modified: u64,
    /// Nanoseconds past `modified`'s second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u32>,
    /// The file's inode number (Unix only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
}

impl IndexEntry {
    /// Whether `now` (a fresh look at the same path) is the file this entry was embedded from.
    /// What this entry did not record (an older manifest) is not compared.
    pub fn unchanged(&self, now: &IndexEntry) -> bool {
        self.path == now.path
            && self.size == now.size
            && self.modified == now.modified
            && self.modified_ns.is_none_or(|ns| now.modified_ns == Some(ns))
            && self.inode.is_none_or(|i| now.inode == Some(i))
    }
}

/// Refuses an index entry's path that could name a file outside the indexed folder (an absolute
/// path, `..`), that no listing of a folder yields (empty parts, `.`, a backslash, NUL), or that is
/// not an image file: the reason names the path.
pub fn check_entry_path(path: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| Err(format!("index entry {path:?} {why}"));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.contains('\\') || path.contains('\0') {
        return bad("holds a backslash or a NUL character");
    }
    if path.starts_with('/') {
        return bad("is an absolute path: entries are relative to the indexed folder");
    }
    for part in path.split('/') {
        match part {
            "" | "." => return bad("has an empty or `.` part"),
            ".." => return bad("leads out of the indexed folder (`..`)"),
            _ => {}
        }
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return bad("is not a plain relative path");
    }
    let image = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| crate::data::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    if !image {
        return bad("is not an image file name");
    }
    Ok(())
}

/// Which segments an update gives an HNSW graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphPolicy {
    /// Segments of [`AUTO_GRAPH_ROWS`] photos up to [`LISTS_MIN_ROWS`]: larger ones have k-means
    /// lists, built in seconds, where a graph would take hours.
    #[default]
    Auto,
    /// Every segment (of two or more photos).
    Always,
    /// None (the compact scan answers every query).
    Never,
}

impl std::str::FromStr for GraphPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "always" => Self::Always,
            "never" => Self::Never,
            _ => bail!("unknown graph policy {s:?}: use auto, always or never"),
        })
    }
}

impl GraphPolicy {
    fn wants(self, rows: usize) -> bool {
        match self {
            Self::Auto => (AUTO_GRAPH_ROWS..LISTS_MIN_ROWS).contains(&rows),
            Self::Always => rows > 1,
            Self::Never => false,
        }
    }
}

/// How [`ImageIndex::update`] stores what it embeds.
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexOptions {
    pub graph: GraphPolicy,
    pub params: GraphParams,
}

pub struct ImageIndex {
    /// The model that made the embeddings (see [`model_fingerprint`]).
    pub fingerprint: String,
    pub root: PathBuf,
    /// Sorted by path.
    pub entries: Vec<IndexEntry>,
    dim: usize,
    segments: Vec<Segment>,
    /// Entry → (position in `segments`, row).
    loc: Vec<(usize, usize)>,
    /// Per segment: row → entry, or [`DEAD`].
    owner: Vec<Vec<u32>>,
    next_segment: u32,
    /// Segments whose files are not yet written where the index was loaded from.
    unsaved: HashSet<u32>,
    /// The folder the index was loaded from (its segment files are there).
    loaded_from: Option<PathBuf>,
}

/// What an update did.
#[derive(Debug, Default, Serialize)]
pub struct UpdateStats {
    pub embedded: usize,
    pub reused: usize,
    pub removed: usize,
    /// Files that could not be read, with the reason; they are left out of the index.
    pub failed: Vec<(String, String)>,
    /// Segments after the update, segments merged by it, and HNSW graphs it built.
    pub segments: usize,
    pub merged: usize,
    pub graphs_built: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

impl ImageIndex {
    /// An empty index of `dim`-wide embeddings.
    pub fn empty(fingerprint: &str, root: &Path, dim: usize) -> Self {
        Self {
            fingerprint: fingerprint.into(),
            root: root.to_path_buf(),
            entries: vec![],
            dim,
            segments: vec![],
            loc: vec![],
            owner: vec![],
            next_segment: 1,
            unsaved: HashSet::new(),
            loaded_from: None,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (segments, of which with an HNSW graph, of which with k-means lists).
    pub fn segment_counts(&self) -> (usize, usize, usize) {
        (
            self.segments.len(),
            self.segments.iter().filter(|s| s.has_graph()).count(),
            self.segments.iter().filter(|s| s.has_lists()).count(),
        )
    }

    /// The stored (L2-normalised) embedding of entry `i`.
    pub fn embedding(&self, i: usize) -> &[f32] {
        let (s, r) = self.loc[i];
        self.segments[s].row(r)
    }

    /// Where entry `i`'s file is.
    pub fn path_of(&self, i: usize) -> PathBuf {
        self.root.join(&self.entries[i].path)
    }

    /// What loading left out (a damaged HNSW graph, whose segment is then searched without it).
    pub fn warnings(&self) -> Vec<String> {
        self.segments
            .iter()
            .filter_map(|s| s.warning().map(str::to_string))
            .collect()
    }

    /// Adds a segment of `rows` (row-major f32); returns its position.
    fn add_segment(&mut self, rows: Vec<f32>, graph: Option<GraphParams>) -> Result<usize> {
        let id = self.next_segment;
        self.next_segment = id
            .checked_add(1)
            .context("the index has used every segment number: rebuild it into a new folder")?;
        self.segments.push(Segment::new(id, self.dim, rows, graph));
        self.unsaved.insert(id);
        Ok(self.segments.len() - 1)
    }

    /// Recomputes which entry owns each stored row, and checks no row has two owners.
    fn rebuild_owner(&mut self) -> Result<()> {
        self.owner = self.segments.iter().map(|s| vec![DEAD; s.rows()]).collect();
        for (i, &(s, r)) in self.loc.iter().enumerate() {
            if self.owner[s][r] != DEAD {
                bail!(
                    "{} and {} share one stored embedding — the index is damaged; rebuild it",
                    self.entries[self.owner[s][r] as usize].path,
                    self.entries[i].path
                );
            }
            self.owner[s][r] = i as u32;
        }
        Ok(())
    }

    /// The `k` best entries for an L2-normalised query (P,), best first, with cosine scores:
    /// the approximate search where segments have a graph, the compact one elsewhere.
    pub fn search(&self, query: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
        let q = query
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.search_with(&q, k, SearchMode::Approx)
    }

    /// The `k` best entries for an L2-normalised query, answered the way `mode` says.
    pub fn search_with(&self, q: &[f32], k: usize, mode: SearchMode) -> Result<Vec<(usize, f32)>> {
        if q.len() != self.dim {
            bail!("the query has {} values, the index {} per image", q.len(), self.dim);
        }
        let mut top = TopK::new(k);
        for (seg, owner) in self.segments.iter().zip(&self.owner) {
            let keep = |r: usize| owner[r] != DEAD;
            for (r, s) in seg.search(q, k, mode, &keep) {
                top.push(owner[r] as usize, s);
            }
        }
        Ok(top.into_sorted())
    }
}
