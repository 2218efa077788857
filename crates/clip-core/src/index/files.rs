//! What an index is made from: the image files under a folder, the model that embeds them, and
//! the embedding itself.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::ClipConfig;
use crate::data::ImageStore;
use crate::embed::l2_normalize;
use crate::model::ClipModel;
use crate::run_dir::WEIGHTS;

/// A stable id of a trained model: FNV-1a over its weights and config files.
pub fn model_fingerprint(run: &Path) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in [WEIGHTS, crate::run_dir::CONFIG] {
        let p = run.join(f);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// A stable id of a pretrained checkpoint: xxh3-128 over its files (config and weights), read in
/// 1 MiB pieces (a ViT-B/32 is 600 MB: this takes a fraction of a second).
pub fn files_fingerprint(files: &[&Path]) -> Result<String> {
    use std::io::Read;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        loop {
            let n = f.read(&mut buf).with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Every image file under `root`, recursively, as sorted relative paths (symlinks contained;
/// see [`crate::data::image_files`], which also says what was left out).
pub fn list_images(root: &Path) -> Result<Vec<String>> {
    Ok(crate::data::image_files(root)?.files)
}

/// The entry for the file at `path` (shown as `rel`): its size, modification time to the
/// nanosecond and, on Unix, its inode, which tell a same-size replacement within one second apart.
pub fn stat(path: &Path, rel: &str) -> Result<super::IndexEntry> {
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let since = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    #[cfg(unix)]
    let inode = Some(std::os::unix::fs::MetadataExt::ino(&m));
    #[cfg(not(unix))]
    let inode = None;
    Ok(super::IndexEntry {
        path: rel.to_string(),
        size: m.len(),
        modified: since.as_secs(),
        modified_ns: Some(since.subsec_nanos()),
        inode,
    })
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
    // One `no_grad` scope for all batches: what the layers prepare from their weights is reused.
    crate::nn::no_grad(|| -> Result<()> {
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
                parts.push(l2_normalize(&model.embed_images(&x)?)?.to_device(&Device::Cpu)?);
            }
            on_progress(group.len());
        }
        Ok(())
    })?;
    let emb = if parts.is_empty() {
        None
    } else {
        Some(Tensor::cat(&parts, 0)?)
    };
    Ok((emb, ok, failed))
}
