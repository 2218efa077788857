//! A frozen tower's outputs, computed once per image or caption and kept on disk.
//!
//! A frozen tower runs in evaluation mode (BatchNorm running statistics, no dropout), so its
//! output for an input never changes while its weights do not: recomputing it every epoch is pure
//! waste, and with both towers frozen it is nearly the whole cost of an epoch. The pooled
//! features (before the projection heads) are therefore computed once and stored under a cache
//! folder, one safetensors file per tower state:
//!
//! - the file name carries a **fingerprint of the tower**: every weight and buffer under its
//!   prefix (names, shapes, values), its config and the preprocessing (image size, crop, mean and
//!   standard deviation). Changing any of them selects another file, so stale features are never
//!   read;
//! - inside, each row is keyed by a **hash of exactly what the tower sees**: an image's decoded,
//!   resized pixels (so a changed file gets a new row, and an identical copy shares one) or a
//!   caption's token ids (the tokenizer's output, so a changed tokenizer or caption gets a new
//!   row, and the thousands of identical captions of class folders share one).
//!
//! Files are written atomically, and each row carries a checksum (xxh3-64 of its key and values):
//! a row whose bytes changed on disk is detected, dropped and computed again, and a file whose
//! header is damaged is rebuilt whole — both with a warning, never silently wrong features. A
//! missing file is an empty cache; any other error reading one (permissions, I/O) is an error.
//! The hash is xxh3-128: a cache key needs spread, not cryptographic strength.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use xxhash_rust::xxh3::Xxh3;

use crate::config::ClipConfig;
pub use crate::data::{FeatureRows, FrozenFeatures};
use crate::data::{ImageStore, Loader, IMAGENET_MEAN, IMAGENET_STD};
use crate::files::write_atomic;
use crate::model::ClipModel;
use crate::params::ParamStore;

/// The cache folder inside a run folder, unless another is named.
pub const CACHE_DIR: &str = "feature-cache";

/// Bumped whenever what a row means changes (a new pooling, a new file layout).
const FORMAT: &str = "clipmine-feature-cache/2";

/// A 128-bit content hash.
pub type Key = [u8; 16];

/// The key of some bytes.
pub fn key_of(bytes: &[u8]) -> Key {
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

/// The key of a caption's token ids.
pub fn key_of_tokens(ids: &[u32]) -> Key {
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    key_of(&bytes)
}

/// Which tower a cache file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedTower {
    Image,
    Text,
}

impl CachedTower {
    pub fn as_str(&self) -> &'static str {
        match self {
            CachedTower::Image => "image",
            CachedTower::Text => "text",
        }
    }

    /// The tower's parameter prefix in the model.
    fn prefix(&self) -> &'static str {
        match self {
            CachedTower::Image => "image_encoder.",
            CachedTower::Text => "text_encoder.",
        }
    }
}

/// Fingerprint of a tower as it computes features now: its tensors (parameters and buffers, by
/// name, shape and value), its config and its preprocessing. 32 hex digits.
pub fn tower_fingerprint(params: &ParamStore, cfg: &ClipConfig, tower: CachedTower) -> Result<String> {
    let mut h = Xxh3::new();
    h.update(FORMAT.as_bytes());
    h.update(tower.as_str().as_bytes());
    h.update(preprocessing(cfg, tower)?.as_bytes());
    for (name, e) in params.entries() {
        if !name.starts_with(tower.prefix()) {
            continue;
        }
        h.update(name.as_bytes());
        for d in e.var.dims() {
            h.update(&(*d as u64).to_le_bytes());
        }
        let values = e
            .var
            .as_tensor()
            .detach()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        h.update(&bytes);
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Everything besides the weights that decides a tower's output for a stored input.
fn preprocessing(cfg: &ClipConfig, tower: CachedTower) -> Result<String> {
    Ok(match tower {
        // The whole data section, not just `center_crop`: whatever decides the pixels is there.
        CachedTower::Image => format!(
            "image {} data {} mean {:?} std {:?}",
            serde_json::to_string(&cfg.image)?,
            serde_json::to_string(&cfg.data)?,
            IMAGENET_MEAN,
            IMAGENET_STD
        ),
        CachedTower::Text => format!("text {}", serde_json::to_string(&cfg.text)?),
    })
}

/// A cache folder.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

/// A stored file's rows, by key.
#[derive(Default)]
struct Stored {
    keys: Vec<Key>,
    data: Vec<f32>,
    /// Rows dropped because their checksum did not match (or 1 for a file that cannot be parsed).
    damaged: usize,
    /// Why the whole file was unusable, when it was.
    broken: Option<String>,
}

impl FeatureCache {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding a tower's features for one fingerprint.
    pub fn file(&self, tower: CachedTower, fingerprint: &str) -> PathBuf {
        self.dir.join(format!("{}-{fingerprint}.safetensors", tower.as_str()))
    }

    /// Features of items with these keys (`None`: the item has none). Rows found in the file are
    /// reused; the others are computed by `compute(items)` → (k, dim), `chunk` items at a time,
    /// and the file is rewritten (atomically) with them added.
    pub fn features(
        &self,
        tower: CachedTower,
        fingerprint: &str,
        dim: usize,
        keys: &[Option<Key>],
        chunk: usize,
        mut compute: impl FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<FeatureRows> {
        let file = self.file(tower, fingerprint);
        let mut stored = read(&file, dim)?;
        let damaged = stored.damaged;
        match &stored.broken {
            Some(why) => eprintln!(
                "warning: the feature cache {} is damaged ({why}): it is rebuilt",
                file.display()
            ),
            None if damaged > 0 => eprintln!(
                "warning: the feature cache {} had {damaged} damaged row(s) (checksum mismatch): they are computed again",
                file.display()
            ),
            None => {}
        }
        let mut index: HashMap<Key, u32> = stored.keys.iter().enumerate().map(|(r, k)| (*k, r as u32)).collect();
        let before = stored.keys.len();
        // One item per key not stored yet.
        let mut missing: Vec<usize> = vec![];
        let mut queued: HashSet<Key> = HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(k) = k {
                if !index.contains_key(k) && queued.insert(*k) {
                    missing.push(i);
                }
            }
        }
        for items in missing.chunks(chunk.max(1)) {
            let t = compute(items).with_context(|| format!("computing {} tower features", tower.as_str()))?;
            if t.dims() != [items.len(), dim] {
                bail!(
                    "the {} tower gave features of shape {:?}, expected {:?}",
                    tower.as_str(),
                    t.dims(),
                    [items.len(), dim]
                );
            }
            let rows = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (&i, row) in items.iter().zip(rows.chunks(dim)) {
                let k = keys[i].expect("only keyed items are computed");
                index.insert(k, stored.keys.len() as u32);
                stored.keys.push(k);
                stored.data.extend_from_slice(row);
            }
        }
        let computed = stored.keys.len() - before;
        if computed > 0 || damaged > 0 {
            write(&file, tower, fingerprint, dim, &stored)?;
        }
        let row_of: Vec<u32> = keys
            .iter()
            .map(|k| k.and_then(|k| index.get(&k).copied()).unwrap_or(u32::MAX))
            .collect();
        // Keep only the rows these items use (the file may hold rows of other datasets).
        let mut used: Vec<u32> = row_of.iter().copied().filter(|&r| r != u32::MAX).collect();
        used.sort_unstable();
        used.dedup();
        let renumber: HashMap<u32, u32> = used.iter().enumerate().map(|(n, &r)| (r, n as u32)).collect();
        let mut data = Vec::with_capacity(used.len() * dim);
        for &r in &used {
            let r = r as usize * dim;
            data.extend_from_slice(&stored.data[r..r + dim]);
        }
        let reused = used.len() - computed.min(used.len());
        let row_of = row_of
            .iter()
            .map(|r| renumber.get(r).copied().unwrap_or(u32::MAX))
            .collect();
        Ok(FeatureRows::new(dim, data, row_of, file, reused, computed, damaged))
    }

    /// Image-tower features of every decoded image of `store`, by image index.
    pub fn image_features(&self, model: &ClipModel, store: &ImageStore, chunk: usize) -> Result<FeatureRows> {
        let fp = tower_fingerprint(&model.params, &model.config, CachedTower::Image)?;
        let keys: Vec<Option<Key>> = (0..store.len())
            .map(|i| Ok(store.rgb(i)?.map(|p| key_of(&p))))
            .collect::<Result<_>>()?;
        let dev = model.device().clone();
        // One `no_grad` scope for all chunks: what the layers prepare from their weights is reused.
        crate::nn::no_grad(|| {
            self.features(
                CachedTower::Image,
                &fp,
                model.config.image.feature_dim(),
                &keys,
                chunk,
                |items| {
                    let x = store.batch_tensor(items, None, &dev)?;
                    model.image_features(&x, false)
                },
            )
        })
    }

    /// Text-tower features of every caption the loader holds, by pair index.
    pub fn text_features(&self, model: &ClipModel, loader: &Loader, pairs: usize, chunk: usize) -> Result<FeatureRows> {
        let fp = tower_fingerprint(&model.params, &model.config, CachedTower::Text)?;
        let keys: Vec<Option<Key>> = (0..pairs).map(|p| Some(key_of_tokens(loader.tokens(p)))).collect();
        crate::nn::no_grad(|| {
            self.features(CachedTower::Text, &fp, model.config.text.dim, &keys, chunk, |items| {
                let (ids, mask) = loader.text_inputs(items)?;
                model.text_features(&ids, &mask, false)
            })
        })
    }
}

/// The checksum of one row: its key and its values.
fn row_sum(key: &Key, row: &[f32]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(key);
    for v in row {
        h.update(&v.to_le_bytes());
    }
    h.digest()
}

/// The rows stored in `file` whose checksums match. A missing file is empty; a file that cannot
/// be parsed is empty with every row counted damaged (it is rewritten); any other read error
/// (permissions, I/O) is returned.
fn read(file: &Path, dim: usize) -> Result<Stored> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::default()),
        Err(e) => return Err(e).with_context(|| format!("reading the feature cache {}", file.display())),
    };
    match parse(&bytes, dim) {
        Ok(s) => Ok(s),
        Err(e) => Ok(Stored {
            damaged: 1,
            broken: Some(format!("{e:#}")),
            ..Stored::default()
        }),
    }
}

fn parse(bytes: &[u8], dim: usize) -> Result<Stored> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let features = st.tensor("features")?;
    let keys = st.tensor("keys")?;
    let sums = st.tensor("sums")?;
    let n = keys.shape().first().copied().unwrap_or(0);
    if features.dtype() != safetensors::Dtype::F32
        || keys.dtype() != safetensors::Dtype::U8
        || sums.dtype() != safetensors::Dtype::U64
        || features.shape() != [n, dim]
        || keys.shape() != [n, 16]
        || sums.shape() != [n]
    {
        bail!("it does not hold {dim}-wide features with their keys and checksums");
    }
    let data: Vec<f32> = features
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let keys: Vec<Key> = keys
        .data()
        .chunks_exact(16)
        .map(|b| b.try_into().expect("16 bytes"))
        .collect();
    let sums = sums
        .data()
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let mut out = Stored::default();
    for ((key, row), sum) in keys.iter().zip(data.chunks_exact(dim.max(1))).zip(sums) {
        if row_sum(key, row) == sum {
            out.keys.push(*key);
            out.data.extend_from_slice(row);
        } else {
            out.damaged += 1;
        }
    }
    Ok(out)
}

fn write(file: &Path, tower: CachedTower, fingerprint: &str, dim: usize, s: &Stored) -> Result<()> {
    let n = s.keys.len();
    let features: Vec<u8> = s.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let keys: Vec<u8> = s.keys.iter().flatten().copied().collect();
    let sums: Vec<u8> = s
        .keys
        .iter()
        .zip(s.data.chunks_exact(dim.max(1)))
        .flat_map(|(k, row)| row_sum(k, row).to_le_bytes())
        .collect();
    let views = [
        (
            "features",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, dim], &features)?,
        ),
        (
            "keys",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, 16], &keys)?,
        ),
        (
            "sums",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U64, vec![n], &sums)?,
        ),
    ];
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("tower", tower.as_str().to_string()),
        ("fingerprint", fingerprint.to_string()),
        ("rows", n.to_string()),
        ("dim", dim.to_string()),
        (
            "keys",
            "xxh3-128 of the tower's input: decoded, resized RGB pixels (image) or token ids (text)".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(file, &bytes).with_context(|| format!("writing the feature cache {}", file.display()))
}
