//! The index folder on disk: reading a manifest (version 2, or version 1 upgraded), writing one
//! with the segments that changed, and what a folder must hold to be written into.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{check_entry_path, ImageIndex, IndexEntry, Segment, EMBEDDINGS_V1, FORMAT_VERSION, MANIFEST};
use crate::files::write_atomic;

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

impl ImageIndex {
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
