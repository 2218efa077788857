//! An image index: L2-normalised embeddings of every image under a folder, searchable by a
//! caption, and updated incrementally (only new or changed files are embedded again).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_atomic, WEIGHTS};
use crate::config::ClipConfig;
use crate::data::ImageStore;
use crate::loss::l2_normalize;
use crate::model::ClipModel;

pub const EMBEDDINGS: &str = "embeddings.safetensors";
pub const MANIFEST: &str = "manifest.json";

/// One indexed file: where it is and what it was when embedded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    /// Path relative to the indexed folder.
    pub path: String,
    pub size: u64,
    pub modified: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    fingerprint: String,
    root: PathBuf,
    dim: usize,
    entries: Vec<IndexEntry>,
}

pub struct ImageIndex {
    /// The model that made the embeddings (see [`model_fingerprint`]).
    pub fingerprint: String,
    pub root: PathBuf,
    pub entries: Vec<IndexEntry>,
    /// (N, P), L2-normalised rows, on the CPU.
    pub embeddings: Tensor,
}

/// What an update did.
#[derive(Debug, Default, Serialize)]
pub struct UpdateStats {
    pub embedded: usize,
    pub reused: usize,
    pub removed: usize,
    /// Files that could not be read, with the reason; they are left out of the index.
    pub failed: Vec<(String, String)>,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// A stable id of a trained model: FNV-1a over its weights and config files.
pub fn model_fingerprint(run: &Path) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in [WEIGHTS, crate::checkpoint::CONFIG] {
        let p = run.join(f);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// Every image file under `root`, recursively, as sorted relative paths (symlinks contained;
/// see [`crate::data::image_files`], which also says what was left out).
pub fn list_images(root: &Path) -> Result<Vec<String>> {
    Ok(crate::data::image_files(root)?.files)
}

fn stat(path: &Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok((m.len(), modified))
}

/// What [`embed_image_files`] returns: the embeddings (N_ok, P) of the readable images, their
/// positions in the input, and (position, reason) for each unreadable one.
pub type Embedded = (Option<Tensor>, Vec<usize>, Vec<(usize, String)>);

/// Embeds images (paths) in batches of `chunk`, decoding each batch in parallel. Returns the
/// L2-normalised embeddings of those that could be read, their positions, and the failures.
pub fn embed_image_files(
    model: &ClipModel,
    cfg: &ClipConfig,
    paths: &[PathBuf],
    chunk: usize,
    mut on_progress: impl FnMut(usize),
) -> Result<Embedded> {
    let dev = model.device().clone();
    let mut parts = vec![];
    let mut ok = vec![];
    let mut failed = vec![];
    for (c, group) in paths.chunks(chunk.max(1)).enumerate() {
        let decoded: Vec<Result<Tensor>> = group.par_iter().map(|p| ImageStore::load_one(p, cfg)).collect();
        let mut good = vec![];
        for (i, d) in decoded.into_iter().enumerate() {
            let idx = c * chunk.max(1) + i;
            match d {
                Ok(t) => {
                    good.push(t);
                    ok.push(idx);
                }
                Err(e) => failed.push((idx, format!("{e:#}"))),
            }
        }
        if !good.is_empty() {
            let x = Tensor::stack(&good, 0)?.to_device(&dev)?;
            parts.push(l2_normalize(&model.encode_image(&x, false)?)?.to_device(&Device::Cpu)?);
        }
        on_progress(group.len());
    }
    let emb = if parts.is_empty() {
        None
    } else {
        Some(Tensor::cat(&parts, 0)?)
    };
    Ok((emb, ok, failed))
}

impl ImageIndex {
    pub fn load(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST);
        let text =
            std::fs::read_to_string(&mpath).with_context(|| format!("reading index manifest {}", mpath.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", mpath.display()))?;
        let epath = dir.join(EMBEDDINGS);
        let mut t = candle_core::safetensors::load(&epath, &Device::Cpu)
            .with_context(|| format!("reading {}", epath.display()))?;
        let embeddings = match t.remove("embeddings") {
            Some(e) => e,
            None if m.entries.is_empty() => Tensor::zeros((0, m.dim), DType::F32, &Device::Cpu)?,
            None => bail!("{} has no `embeddings` tensor", epath.display()),
        };
        if embeddings.dim(0)? != m.entries.len() {
            bail!(
                "index {} is inconsistent: {} embeddings for {} files — rebuild it",
                dir.display(),
                embeddings.dim(0)?,
                m.entries.len()
            );
        }
        Ok(Self {
            fingerprint: m.fingerprint,
            root: m.root,
            entries: m.entries,
            embeddings,
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut map = HashMap::new();
        if !self.entries.is_empty() {
            map.insert("embeddings".to_string(), self.embeddings.clone());
        }
        write_atomic(&dir.join(EMBEDDINGS), &crate::checkpoint::safetensors_bytes(&map)?)?;
        let m = Manifest {
            fingerprint: self.fingerprint.clone(),
            root: self.root.clone(),
            dim: self.embeddings.dim(1)?,
            entries: self.entries.clone(),
        };
        write_atomic(&dir.join(MANIFEST), serde_json::to_string_pretty(&m)?.as_bytes())
    }

    /// Builds or refreshes an index of `root`: files unchanged since `previous` (same model, path,
    /// size and modification time) keep their embedding; new or changed ones are embedded; deleted
    /// ones are dropped. An index made by another model is refused.
    pub fn update(
        previous: Option<ImageIndex>,
        model: &ClipModel,
        fingerprint: &str,
        root: &Path,
        chunk: usize,
        on_progress: impl FnMut(usize),
    ) -> Result<(Self, UpdateStats)> {
        let started = std::time::Instant::now();
        if let Some(p) = &previous {
            if p.fingerprint != fingerprint {
                bail!("this index was made by another model (fingerprint {}, this run {fingerprint}): write a new index with --out, or delete it", p.fingerprint);
            }
        }
        let listing = crate::data::image_files(root)?;
        let files = listing.files;
        let mut old: HashMap<String, (IndexEntry, usize)> = HashMap::new();
        if let Some(p) = &previous {
            for (i, e) in p.entries.iter().enumerate() {
                old.insert(e.path.clone(), (e.clone(), i));
            }
        }
        let mut stats = UpdateStats::default();
        // Links leading outside the folder, or to folders, are left out and said so.
        stats.failed.extend(listing.skipped);
        let mut keep = vec![]; // (entry, Some(old row) | None)
        let mut todo = vec![];
        for f in &files {
            let (size, modified) = stat(&root.join(f))?;
            let entry = IndexEntry {
                path: f.clone(),
                size,
                modified,
            };
            match old.get(f) {
                Some((e, row)) if *e == entry => keep.push((entry, Some(*row))),
                _ => {
                    todo.push(keep.len());
                    keep.push((entry, None));
                }
            }
        }
        stats.removed = old.keys().filter(|k| !files.contains(k)).count();
        let paths: Vec<PathBuf> = todo.iter().map(|&i| root.join(&keep[i].0.path)).collect();
        let (new_emb, ok, failed) = embed_image_files(model, &model.config, &paths, chunk, on_progress)?;
        let failed_set: std::collections::HashSet<usize> = failed.iter().map(|(i, _)| todo[*i]).collect();
        for (i, reason) in failed {
            stats.failed.push((keep[todo[i]].0.path.clone(), reason));
        }
        let new_rows: HashMap<usize, usize> = ok.iter().enumerate().map(|(row, &i)| (todo[i], row)).collect();
        let mut rows = vec![];
        let mut entries = vec![];
        for (k, (entry, old_row)) in keep.into_iter().enumerate() {
            if failed_set.contains(&k) {
                continue;
            }
            let row = match old_row {
                Some(r) => {
                    stats.reused += 1;
                    previous.as_ref().unwrap().embeddings.get(r)?
                }
                None => {
                    stats.embedded += 1;
                    new_emb.as_ref().expect("embedded").get(new_rows[&k])?
                }
            };
            rows.push(row);
            entries.push(entry);
        }
        let dim = model.config.projection_dim;
        let embeddings = if rows.is_empty() {
            Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?
        } else {
            Tensor::stack(&rows, 0)?
        };
        stats.seconds = started.elapsed().as_secs_f64();
        stats.images_per_second = stats.embedded as f64 / stats.seconds.max(1e-9);
        Ok((
            Self {
                fingerprint: fingerprint.into(),
                root: root.to_path_buf(),
                entries,
                embeddings,
            },
            stats,
        ))
    }

    /// The `k` best rows for an L2-normalised query (P,), best first, with cosine scores.
    pub fn search(&self, query: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
        top_k(&self.embeddings, query, k)
    }
}

/// Top-k rows of `matrix` (N, P) by dot product with `query` (P,), best first.
///
/// A search reads every embedding once, so it is bound by memory bandwidth: on the CPU the rows
/// are scanned in parallel straight from the tensor's storage, each thread keeping its own best
/// k; elsewhere it is one matrix–vector product and a partial selection.
pub fn top_k(matrix: &Tensor, query: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let (n, p) = matrix.dims2()?;
    if n == 0 || k == 0 {
        return Ok(vec![]);
    }
    let k = k.min(n);
    let q = query
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if q.len() != p {
        bail!("the query has {} values, the index {p} per image", q.len());
    }
    if let Some(hits) = crate::nn::dispatch::with_host_f32(matrix, |data| scan_top_k(data, p, &q, k)) {
        return Ok(hits);
    }
    let qt = Tensor::new(q.as_slice(), matrix.device())?.unsqueeze(1)?;
    let scores = matrix.matmul(&qt)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(select(scores.into_iter().enumerate().collect(), k))
}

/// The k best (index, score) pairs, best first.
fn select(mut v: Vec<(usize, f32)>, k: usize) -> Vec<(usize, f32)> {
    let cmp = |a: &(usize, f32), b: &(usize, f32)| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    if k < v.len() {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_by(cmp);
    v
}

fn scan_top_k(data: &[f32], p: usize, q: &[f32], k: usize) -> Vec<(usize, f32)> {
    const ROWS: usize = 16_384;
    let best: Vec<(usize, f32)> = data
        .par_chunks(ROWS * p)
        .enumerate()
        .flat_map_iter(|(c, chunk)| {
            let scores: Vec<(usize, f32)> = chunk
                .chunks_exact(p)
                .enumerate()
                .map(|(r, row)| (c * ROWS + r, row.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
                .collect();
            select(scores, k)
        })
        .collect();
    select(best, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_scan_agrees_with_a_matrix_product() {
        let (n, p) = (40_000, 8);
        let data: Vec<f32> = (0..n * p)
            .map(|i| ((i * 7919 % 10007) as f32 / 10007.0) - 0.5)
            .collect();
        let m = Tensor::from_vec(data, (n, p), &Device::Cpu).unwrap();
        let q = Tensor::new(&[0.3f32, -0.1, 0.5, 0.2, -0.4, 0.1, 0.0, 0.7], &Device::Cpu).unwrap();
        let fast = top_k(&m, &q, 7).unwrap();
        let scores = m
            .matmul(&q.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let slow = select(scores.into_iter().enumerate().collect(), 7);
        assert_eq!(
            fast.iter().map(|x| x.0).collect::<Vec<_>>(),
            slow.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        assert!(fast.windows(2).all(|w| w[0].1 >= w[1].1));
        // A strided (non-contiguous) matrix takes the matmul path and gives the same answer.
        let t = m.t().unwrap().contiguous().unwrap().t().unwrap();
        assert_eq!(
            top_k(&t, &q, 7).unwrap().iter().map(|x| x.0).collect::<Vec<_>>(),
            fast.iter().map(|x| x.0).collect::<Vec<_>>()
        );
    }
}
