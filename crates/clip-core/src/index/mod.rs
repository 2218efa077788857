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

mod approx;
mod files;
mod lists;
mod quant;
mod scan;
mod segment;

use std::collections::{HashMap, HashSet};
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

use crate::files::write_atomic;
use crate::model::ClipModel;

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

#[derive(Debug, Serialize, Deserialize)]
struct SegmentInfo {
    id: u32,
    rows: usize,
    graph: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Located {
    #[serde(flatten)]
    entry: IndexEntry,
    segment: u32,
    row: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    fingerprint: String,
    root: PathBuf,
    dim: usize,
    next_segment: u32,
    segments: Vec<SegmentInfo>,
    entries: Vec<Located>,
}

/// Version 1: no version field, one embeddings file in entry order.
#[derive(Debug, Deserialize)]
struct ManifestV1 {
    fingerprint: String,
    root: PathBuf,
    dim: usize,
    entries: Vec<IndexEntry>,
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

    /// Reads the index in `dir`. A damaged HNSW graph is not an error (the segment is searched
    /// without it): it is printed as a warning on stderr and kept in [`ImageIndex::warnings`].
    pub fn load(dir: &Path) -> Result<Self> {
        let idx = Self::load_unchecked(dir)?;
        for w in idx.warnings() {
            eprintln!("warning: {w}");
        }
        Ok(idx)
    }

    fn load_unchecked(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST);
        let text =
            std::fs::read_to_string(&mpath).with_context(|| format!("reading index manifest {}", mpath.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", mpath.display()))?;
        match value.get("version").map(|v| v.as_u64()) {
            None => Self::load_v1(dir, serde_json::from_value(value).with_context(|| format!("parsing {}", mpath.display()))?),
            Some(Some(v)) if v == FORMAT_VERSION as u64 => {
                let m: Manifest = serde_json::from_value(value).with_context(|| format!("parsing {}", mpath.display()))?;
                Self::load_v2(dir, m).with_context(|| format!("loading index {}", dir.display()))
            }
            Some(Some(v)) if v > FORMAT_VERSION as u64 => bail!(
                "index {} has format version {v}, newer than this build reads ({FORMAT_VERSION}): update clipmine, or rebuild the index with this one (`clip-predict index --out NEW_FOLDER`)",
                dir.display()
            ),
            Some(v) => bail!("{}: unknown index format version {v:?}", mpath.display()),
        }
    }

    fn load_v2(dir: &Path, m: Manifest) -> Result<Self> {
        check_entries(m.entries.iter().map(|l| &l.entry))?;
        let mut idx = Self::empty(&m.fingerprint, &resolve_root(dir, &m.root), m.dim);
        idx.next_segment = m.next_segment;
        let mut pos = HashMap::new();
        for s in &m.segments {
            if s.id >= m.next_segment {
                bail!(
                    "segment {} is not below next_segment {} — the manifest is damaged",
                    s.id,
                    m.next_segment
                );
            }
            if pos.insert(s.id, idx.segments.len()).is_some() {
                bail!("segment {} is listed twice — the manifest is damaged", s.id);
            }
            idx.segments.push(Segment::read(dir, s.id, m.dim, s.rows, s.graph)?);
        }
        for l in m.entries {
            let Some(&p) = pos.get(&l.segment) else {
                bail!(
                    "{} is in segment {}, which the manifest does not list",
                    l.entry.path,
                    l.segment
                );
            };
            if l.row >= idx.segments[p].rows() {
                bail!(
                    "{} is row {} of segment {}, which has {} rows",
                    l.entry.path,
                    l.row,
                    l.segment,
                    idx.segments[p].rows()
                );
            }
            idx.loc.push((p, l.row));
            idx.entries.push(l.entry);
        }
        idx.rebuild_owner()?;
        idx.loaded_from = Some(dir.to_path_buf());
        Ok(idx)
    }

    /// Reads a version 1 index into one (unsaved) segment; saving writes it as version 2.
    fn load_v1(dir: &Path, m: ManifestV1) -> Result<Self> {
        check_entries(m.entries.iter()).with_context(|| format!("loading index {}", dir.display()))?;
        let epath = dir.join(EMBEDDINGS_V1);
        let mut t = candle_core::safetensors::load(&epath, &Device::Cpu)
            .with_context(|| format!("reading {}", epath.display()))?;
        let embeddings = match t.remove("embeddings") {
            Some(e) => e,
            None if m.entries.is_empty() => Tensor::zeros((0, m.dim), DType::F32, &Device::Cpu)?,
            None => bail!("{} has no `embeddings` tensor", epath.display()),
        };
        if embeddings.dims2()? != (m.entries.len(), m.dim) {
            bail!(
                "index {} is inconsistent: {:?} embeddings for {} files of {} values — rebuild it",
                dir.display(),
                embeddings.dims(),
                m.entries.len(),
                m.dim
            );
        }
        let rows = embeddings.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut idx = Self::empty(&m.fingerprint, &resolve_root(dir, &m.root), m.dim);
        let n = m.entries.len();
        idx.entries = m.entries;
        if n > 0 {
            idx.add_segment(rows, None)?;
            idx.loc = (0..n).map(|r| (0, r)).collect();
        }
        idx.rebuild_owner()?;
        Ok(idx)
    }

    /// Writes what changed: new segments, then the manifest (each atomically), then removes the
    /// files that the folder's previous manifest recorded and this one does not (merged segments,
    /// a version 1 index's embeddings). Nothing else in the folder is touched, and a folder that
    /// is neither new, empty nor an index is refused (see [`ImageIndex::check_folder`]). The root
    /// is recorded as an absolute path.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        let recorded = Self::check_folder(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let same = self.loaded_from.as_deref().is_some_and(|d| same_dir(d, dir));
        for s in &self.segments {
            if !same || self.unsaved.contains(&s.id) {
                s.write(dir)?;
            }
        }
        let m = Manifest {
            version: FORMAT_VERSION,
            fingerprint: self.fingerprint.clone(),
            root: std::path::absolute(&self.root).with_context(|| format!("resolving {}", self.root.display()))?,
            dim: self.dim,
            next_segment: self.next_segment,
            segments: self
                .segments
                .iter()
                .map(|s| SegmentInfo {
                    id: s.id,
                    rows: s.rows(),
                    graph: s.has_graph(),
                })
                .collect(),
            entries: self
                .entries
                .iter()
                .zip(&self.loc)
                .map(|(e, &(p, row))| Located {
                    entry: e.clone(),
                    segment: self.segments[p].id,
                    row,
                })
                .collect(),
        };
        write_atomic(&dir.join(MANIFEST), serde_json::to_string(&m)?.as_bytes())?;
        self.unsaved.clear();
        self.loaded_from = Some(dir.to_path_buf());
        let live: HashSet<String> = self.segments.iter().flat_map(|s| s.file_names()).collect();
        for name in recorded.difference(&live) {
            let p = dir.join(name);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing the stale {}", p.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether an index may be written into `dir`: a folder that does not exist yet, an empty
    /// one, or one that holds an index (its `manifest.json` reads as an index manifest of a
    /// version this build reads). Returns the files that manifest records (segment files, or a
    /// version 1 index's embeddings), the only ones a save may remove.
    pub fn check_folder(dir: &Path) -> Result<HashSet<String>> {
        let mpath = dir.join(MANIFEST);
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            Ok(m) if !m.is_dir() => bail!(
                "{} is not a folder: an index is written into a folder of its own",
                dir.display()
            ),
            Ok(_) if mpath.is_file() => {}
            Ok(_) => {
                let mut listing = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
                if listing.next().is_none() {
                    return Ok(HashSet::new());
                }
                bail!(
                    "{} is not empty and holds no image index (no {MANIFEST}): an index is written into a folder of its own — name a new or empty folder (--out)",
                    dir.display()
                );
            }
        }
        let not_ours = |e: anyhow::Error| {
            e.context(format!(
                "{} holds a {MANIFEST} that is not a readable image index: an index is written into a folder of its own — name a new or empty folder (--out)",
                dir.display()
            ))
        };
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("reading {}", mpath.display()))
            .map_err(not_ours)?;
        recorded_files(&text).map_err(not_ours)
    }

    /// Builds or refreshes an index of `root`: files unchanged since `previous` (same model, path,
    /// size, modification time to the nanosecond and inode: see [`IndexEntry`]) keep their embedding; new or changed ones are embedded into a
    /// new segment; deleted ones are dropped. An index made by another model is refused.
    pub fn update(
        previous: Option<ImageIndex>,
        model: &ClipModel,
        fingerprint: &str,
        root: &Path,
        chunk: usize,
        opts: &IndexOptions,
        on_progress: impl FnMut(usize),
    ) -> Result<(Self, UpdateStats)> {
        Self::update_with(previous, fingerprint, model.embed_dim(), root, opts, |paths| {
            embed_image_files(model, &model.config, paths, chunk, on_progress)
        })
    }

    /// [`ImageIndex::update`] with any embedder of `dim`-wide rows: `embed` gets the files to
    /// embed and returns what [`embed_image_files`] does.
    pub fn update_with(
        previous: Option<ImageIndex>,
        fingerprint: &str,
        dim: usize,
        root: &Path,
        opts: &IndexOptions,
        embed: impl FnOnce(&[PathBuf]) -> Result<Embedded>,
    ) -> Result<(Self, UpdateStats)> {
        let started = std::time::Instant::now();
        let mut idx = match previous {
            Some(p) if p.fingerprint != fingerprint => bail!(
                "this index was made by another model (fingerprint {}, this run {fingerprint}): write a new index with --out, or delete it",
                p.fingerprint
            ),
            Some(p) if p.dim != dim => bail!("this index holds {}-wide embeddings, the model makes {dim}", p.dim),
            Some(p) => p,
            None => Self::empty(fingerprint, root, dim),
        };
        idx.root = root.to_path_buf();
        let listing = crate::data::image_files(root)?;
        let mut stats = UpdateStats::default();
        // A name the index could not be reopened with (a backslash, say) is left out and said so.
        let mut files = listing.files;
        files.retain(|f| match check_entry_path(f) {
            Ok(()) => true,
            Err(why) => {
                stats.failed.push((f.clone(), format!("{why}: left out of the index")));
                false
            }
        });
        let old: HashMap<&str, usize> = idx
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        // Links leading outside the folder, or to folders, are left out and said so.
        stats.failed.extend(listing.skipped);
        let present: HashSet<&str> = files.iter().map(String::as_str).collect();
        stats.removed = old.keys().filter(|k| !present.contains(*k)).count();
        // Each file: reuse an old row, or embed it.
        let mut plan = vec![]; // (entry, Some(old entry index) | None)
        let mut todo = vec![];
        for f in &files {
            let entry = files::stat(&root.join(f), f)?;
            match old.get(f.as_str()) {
                Some(&i) if idx.entries[i].unchanged(&entry) => plan.push((entry, Some(i))),
                _ => {
                    todo.push(plan.len());
                    plan.push((entry, None));
                }
            }
        }
        drop(old);
        let paths: Vec<PathBuf> = todo.iter().map(|&i| root.join(&plan[i].0.path)).collect();
        let (new_emb, ok, failed) = embed(&paths)?;
        let failed_set: HashSet<usize> = failed.iter().map(|(i, _)| todo[*i]).collect();
        for (i, reason) in failed {
            stats.failed.push((plan[todo[i]].0.path.clone(), reason));
        }
        let new_rows: HashMap<usize, usize> = ok.iter().enumerate().map(|(row, &i)| (todo[i], row)).collect();
        let new_seg = match new_emb {
            Some(t) => {
                let rows = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let n = ok.len();
                if rows.len() != n * dim {
                    bail!("the embedder returned {} values for {n} images of {dim}", rows.len());
                }
                let graph = opts.graph.wants(n).then_some(opts.params);
                stats.graphs_built += graph.is_some() as usize;
                Some(idx.add_segment(rows, graph)?)
            }
            None => None,
        };
        let mut entries = vec![];
        let mut loc = vec![];
        for (k, (entry, old_i)) in plan.into_iter().enumerate() {
            if failed_set.contains(&k) {
                continue;
            }
            match old_i {
                Some(i) => {
                    stats.reused += 1;
                    loc.push(idx.loc[i]);
                }
                None => {
                    stats.embedded += 1;
                    loc.push((new_seg.expect("embedded rows have a segment"), new_rows[&k]));
                }
            }
            entries.push(entry);
        }
        idx.entries = entries;
        idx.loc = loc;
        idx.rebuild_owner()?;
        stats.merged = idx.compact(opts)?;
        for s in idx.segments.iter_mut() {
            if !s.has_graph() && opts.graph.wants(s.rows()) {
                s.add_graph(opts.params);
                idx.unsaved.insert(s.id);
                stats.graphs_built += 1;
            }
        }
        stats.segments = idx.segments.len();
        stats.seconds = started.elapsed().as_secs_f64();
        stats.images_per_second = stats.embedded as f64 / stats.seconds.max(1e-9);
        Ok((idx, stats))
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

    /// Drops segments with no live rows, then merges: every segment when more than
    /// [`MAX_DEAD_SHARE`] of the stored rows are deleted, all but the largest when there are
    /// more than [`MAX_SEGMENTS`]. Returns how many segments were merged away.
    fn compact(&mut self, opts: &IndexOptions) -> Result<usize> {
        let stored: usize = self.segments.iter().map(Segment::rows).sum();
        let dead = stored - self.entries.len();
        let mut chosen: Vec<usize> = if stored > 0 && dead as f64 > MAX_DEAD_SHARE * stored as f64 {
            (0..self.segments.len()).collect()
        } else if self.segments.len() > MAX_SEGMENTS {
            let largest = (0..self.segments.len())
                .max_by_key(|&s| self.segments[s].rows())
                .unwrap_or(0);
            (0..self.segments.len()).filter(|&s| s != largest).collect()
        } else {
            vec![]
        };
        // Segments whose rows are all deleted go anyway.
        for (s, o) in self.owner.iter().enumerate() {
            if o.iter().all(|&e| e == DEAD) && !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        if chosen.is_empty() {
            return Ok(0);
        }
        let chosen_set: HashSet<usize> = chosen.iter().copied().collect();
        let mut rows = vec![];
        let mut moved = vec![];
        for (i, &(s, r)) in self.loc.iter().enumerate() {
            if chosen_set.contains(&s) {
                rows.extend_from_slice(self.segments[s].row(r));
                moved.push(i);
            }
        }
        // Remove the chosen segments, renumbering the positions of the others.
        let mut new_pos = vec![usize::MAX; self.segments.len()];
        let mut kept = vec![];
        for (s, seg) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            if chosen_set.contains(&s) {
                self.unsaved.remove(&seg.id);
            } else {
                new_pos[s] = kept.len();
                kept.push(seg);
            }
        }
        self.segments = kept;
        for l in self.loc.iter_mut() {
            if !chosen_set.contains(&l.0) {
                l.0 = new_pos[l.0];
            }
        }
        if !moved.is_empty() {
            let n = moved.len();
            let graph = opts.graph.wants(n).then_some(opts.params);
            let p = self.add_segment(rows, graph)?;
            for (row, &i) in moved.iter().enumerate() {
                self.loc[i] = (p, row);
            }
        }
        self.rebuild_owner()?;
        Ok(chosen.len())
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

/// Whether two paths name the same folder (after resolving links, when both exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A manifest's `root` as a folder: a relative one is relative to the index folder (never to the
/// current directory).
fn resolve_root(dir: &Path, root: &Path) -> PathBuf {
    if root.is_absolute() {
        root.to_path_buf()
    } else {
        dir.join(root)
    }
}

/// Refuses entries whose paths [`check_entry_path`] refuses, or that are listed twice.
fn check_entries<'a>(entries: impl Iterator<Item = &'a IndexEntry>) -> Result<()> {
    let mut seen = HashSet::new();
    for e in entries {
        check_entry_path(&e.path)
            .map_err(|why| anyhow::anyhow!("{why} — the manifest is damaged or not an index's"))?;
        if !seen.insert(e.path.as_str()) {
            bail!("index entry {:?} is listed twice — the manifest is damaged", e.path);
        }
    }
    Ok(())
}

/// What an index manifest records for [`ImageIndex::check_folder`]: only what it needs, so a
/// large index's entries are skipped over.
#[derive(Deserialize)]
struct Recorded {
    version: Option<u32>,
    #[allow(dead_code)]
    fingerprint: String,
    #[serde(default)]
    segments: Vec<RecordedSegment>,
    #[allow(dead_code)]
    entries: serde::de::IgnoredAny,
}

#[derive(Deserialize)]
struct RecordedSegment {
    id: u32,
}

/// The files an index manifest (`text`) records: each segment's (`seg-NNNNNN.safetensors` and
/// its graph's name, the names being made from the segment's number), or version 1's embeddings.
fn recorded_files(text: &str) -> Result<HashSet<String>> {
    let r: Recorded = serde_json::from_str(text).context("parsing it as an index manifest")?;
    match r.version {
        None => Ok(HashSet::from([EMBEDDINGS_V1.to_string()])),
        Some(FORMAT_VERSION) => Ok(r.segments.iter().flat_map(|s| Segment::file_names_of(s.id)).collect()),
        Some(v) => {
            bail!("it has index format version {v}, which this build does not write (it writes {FORMAT_VERSION})")
        }
    }
}
