//! The persistent image cache: every image decoded and resized once, into one file per dataset
//! and preprocessing, reused by later runs and by every stage.
//!
//! Decoding is the expensive part of loading a dataset (milliseconds per JPEG; minutes per start
//! for 100,000 photos on 2 cores), and keeping the decoded pixels in memory caps a dataset at the
//! machine's RAM (147 KiB per image at 224 px). The cache fixes both: the pixels live in a file,
//! each batch reads its slots, and the operating system's page cache keeps what fits, so a
//! process's memory no longer grows with the dataset; a later start only checks each file's
//! length and modification time.
//!
//! Slots are read with positioned reads (`pread`), not through a memory map. A map's page fault
//! also maps the neighbouring pages the kernel already holds (its "fault-around", 64 KiB), and
//! those stay counted in the process's resident memory until something touches their own slot:
//! reading 20,000 random 224 px slots of a mapped 30 GB cache, releasing each slot after
//! reading it (`MADV_DONTNEED`, even with `MADV_RANDOM`), still left 830 MB resident and growing
//! (a 200,000-image epoch peaked at 3.3 GB). A read copies 147 KiB per image, which costs
//! little next to converting it to normalised floats, and leaves nothing behind.
//!
//! Layout of a cache folder (by default `<dataset>/.clipmine-cache/`):
//!
//! - `images-<dataset>-<S>px-<resize|crop>.json`, the **manifest** (versioned, see [`FORMAT`]): the
//!   preprocessing, the data file's name, and one entry per image: its file (and tar member),
//!   length and modification time, and its slot in the data file — or the reason it could not be
//!   decoded, so a broken file is not decoded again every start.
//! - `images-<dataset>-<S>px-<resize|crop>-<generation>.bin`, the **data**: slot k holds 3·S² bytes of HWC
//!   RGB at `k × stride`, the stride rounded up to 4 KiB pages so a slot can be released on its own.
//!
//! A changed file (other length or time) or an added one is decoded again; a removed one is
//! dropped. Any change writes a new data file (unchanged slots are copied from the old one), then
//! the manifest, each through a temporary file and a rename, so a reader never sees half a cache
//! and two runs building at once each leave a whole one.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::origin::{Origin, Stamp};
use crate::progress::Progress;

/// The default cache folder's name, inside the dataset's folder (hidden, so class-folder scans
/// skip it).
pub const CACHE_DIR: &str = ".clipmine-cache";

/// Bumped whenever the meaning of the data changes (decoder, resize filter, layout). 2: each
/// entry holds its slot's checksum.
const FORMAT: u32 = 2;

/// Slots start on page boundaries.
const PAGE: usize = 4096;

/// What the cache held for this run, for stage 2's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheReport {
    /// The manifest file.
    pub manifest: PathBuf,
    /// Images found in the cache, unchanged.
    pub hits: usize,
    /// Images decoded now (new or changed).
    pub built: usize,
    /// Entries of files no longer in the dataset, dropped.
    pub dropped: usize,
    /// Size of the data file.
    pub bytes_on_disk: u64,
}

impl std::fmt::Display for CacheReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.built == 0 && self.dropped == 0 {
            "hit".to_string()
        } else {
            format!("{} decoded now", self.built)
        };
        write!(
            f,
            "{what}: {} from the cache, {} dropped; {:.1} MiB on disk in {}",
            self.hits,
            self.dropped,
            self.bytes_on_disk as f64 / (1 << 20) as f64,
            self.manifest.display()
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    size: usize,
    /// How the pixels were made from the files: crop or resize, crop share, resampling filter.
    variant: String,
    stride: usize,
    /// The data file, in the same folder.
    data: String,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<String>,
    stamp: Stamp,
    /// Slot in the data file; `None` when the image could not be decoded (`error` says why).
    slot: Option<usize>,
    /// xxh3-64 of the slot's pixels: a slot whose bytes changed on disk is decoded again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sum: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The cache of a dataset's images, opened for reading.
pub(crate) struct Cached {
    /// The data file (read with [`read_at`]), and where it is (to repair a damaged slot).
    pub file: File,
    pub path: PathBuf,
    /// The checksum of each image's slot ([`slot_sum`]).
    pub sums: Vec<Option<u64>>,
    pub stride: usize,
    /// Slot of each image; `None` where it failed (see `errors`).
    pub slots: Vec<Option<usize>>,
    pub errors: Vec<Option<String>>,
    pub report: CacheReport,
}

/// Each image's result of a build: its slot's checksum, or why it has none.
type SlotResults = Vec<Result<u64, String>>;

/// The checksum of a slot's pixels.
pub(crate) fn slot_sum(pixels: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(pixels)
}

/// Bytes between slots for S×S images.
pub(crate) fn stride(size: usize) -> usize {
    (3 * size * size).div_ceil(PAGE) * PAGE
}

/// The files' common name: the dataset (a hash of its captions file, folder or first shard, so
/// two datasets sharing a folder or a `--image-cache DIR` keep separate caches) and the
/// preprocessing.
fn names(dataset: &Path, size: usize, variant: &str) -> String {
    let id = xxhash_rust::xxh3::xxh3_64(dataset.as_os_str().as_encoded_bytes());
    format!("images-{:08x}-{size}px-{variant}", id >> 32)
}

/// Opens (or builds, or updates) the cache in `dir` for these images at `size` px. `decode`
/// prepares one image (as the in-memory store would); it runs in parallel, only for images the
/// cache lacks.
pub(crate) fn open(
    dir: &Path,
    dataset: &Path,
    origins: &[Origin],
    size: usize,
    variant: &str,
    decode: &(dyn Fn(&Origin) -> Result<Vec<u8>> + Sync),
    progress: &dyn Progress,
) -> Result<Cached> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the image cache folder {}", dir.display()))?;
    let base = names(dataset, size, variant);
    let manifest_path = dir.join(format!("{base}.json"));
    let stride = stride(size);

    let stamps: Vec<Result<Stamp, String>> = origins
        .par_iter()
        .map(|o| o.stamp().map_err(|e| format!("{e:#}")))
        .collect();
    let old = previous(dir, &manifest_path, size, variant, stride);
    let found = still_valid(old.as_ref().map(|(m, _, _)| m), origins, &stamps);
    let hits = found.iter().filter(|e| e.is_some()).count();
    let dropped = old.as_ref().map_or(0, |(m, _, _)| unused(m, origins));

    let full_hit = hits == origins.len() && dropped == 0;
    let slots: Vec<Option<usize>> = found.iter().map(|e| e.and_then(|e| e.slot)).collect();
    let sums: Vec<Option<u64>> = found.iter().map(|e| e.and_then(|e| e.sum)).collect();
    let errors: Vec<Option<String>> = found.iter().map(|e| e.and_then(|e| e.error.clone())).collect();
    if full_hit && old.is_some() {
        // A full hit: read the data file as it is.
        let Some((m, file, bytes_on_disk)) = old else {
            unreachable!("checked above")
        };
        return Ok(Cached {
            file,
            path: dir.join(&m.data),
            sums,
            stride,
            slots,
            errors,
            report: CacheReport {
                manifest: manifest_path,
                hits,
                built: 0,
                dropped: 0,
                bytes_on_disk,
            },
        });
    }

    // Build a new data file: unchanged images are copied, the others decoded, in parallel.
    let n = origins.len();
    let fresh = |i: usize| -> Result<Vec<u8>, String> {
        let r = stamps[i]
            .clone()
            .and_then(|_| decode(&origins[i]).map_err(|e| format!("{e:#}")));
        progress.inc(1);
        r
    };
    let old_file = old.as_ref().map(|(_, file, _)| file);
    let (data_name, data_path, results) = write_data(dir, &base, n, stride, |file| {
        progress.start("decoding images", (n - hits) as u64);
        let results = fill(file, old_file, &found, stride, 3 * size * size, &fresh);
        progress.finish();
        results
    })?;
    let manifest = Manifest {
        format: FORMAT,
        size,
        variant: variant.to_string(),
        stride,
        data: data_name,
        entries: entries(origins, &stamps, &results),
    };
    replace_manifest(dir, &manifest_path, &manifest, old.as_ref().map(|(m, _, _)| m))?;
    built(data_path, stride, results, manifest_path, hits, dropped)
}

/// The previous manifest with its data file open and that file's length, when the file is long
/// enough for every slot the manifest names (a truncated one is rebuilt, not read past its end).
fn previous(
    dir: &Path,
    manifest_path: &Path,
    size: usize,
    variant: &str,
    stride: usize,
) -> Option<(Manifest, File, u64)> {
    let m = read_manifest(manifest_path, size, variant, stride)?;
    let file = File::open(dir.join(&m.data)).ok()?;
    let len = file.metadata().ok()?.len();
    let end = m
        .entries
        .iter()
        .filter_map(|e| e.slot)
        .max()
        .map_or(0, |s| (s + 1) * stride);
    (len >= end as u64).then_some((m, file, len))
}

/// The old entry of each image, where it is still valid (same file, member and stamp), so only
/// the others are decoded.
fn still_valid<'m>(
    old: Option<&'m Manifest>,
    origins: &[Origin],
    stamps: &[Result<Stamp, String>],
) -> Vec<Option<&'m Entry>> {
    let lookup: HashMap<(&Path, Option<&str>), &Entry> = old
        .map(|m| {
            m.entries
                .iter()
                .map(|e| ((e.file.as_path(), e.member.as_deref()), e))
                .collect()
        })
        .unwrap_or_default();
    origins
        .iter()
        .zip(stamps)
        .map(|(o, s)| {
            let e = lookup.get(&(o.file(), o.member()))?;
            (s.as_ref().ok() == Some(&e.stamp)).then_some(*e)
        })
        .collect()
}

/// How many entries of `old` no image of this dataset uses (removed files, or another dataset
/// sharing the folder): any makes the open a rebuild, so the manifest forgets them.
fn unused(old: &Manifest, origins: &[Origin]) -> usize {
    let current: HashSet<(&Path, Option<&str>)> = origins.iter().map(|o| (o.file(), o.member())).collect();
    old.entries
        .iter()
        .filter(|e| !current.contains(&(e.file.as_path(), e.member.as_deref())))
        .count()
}

/// Writes every image's slot of the new data `file`, in parallel: an unchanged image is copied
/// from `old` (decoded again, by `fresh`, when its slot no longer matches its checksum), the
/// others decoded. Each image's result is its slot's checksum, or why it has none; an I/O
/// error of the cache itself starts with "reading the image cache" or "writing the image cache".
fn fill(
    file: &File,
    old: Option<&File>,
    found: &[Option<&Entry>],
    stride: usize,
    per: usize,
    fresh: &(dyn Fn(usize) -> Result<Vec<u8>, String> + Sync),
) -> SlotResults {
    (0..found.len())
        .into_par_iter()
        .map(|i| {
            let pixels = match (found[i], old) {
                (Some(e), _) if e.slot.is_none() => return Err(e.error.clone().unwrap_or_default()),
                (Some(e), Some(old)) => {
                    let s = e.slot.expect("checked above");
                    let mut px = vec![0u8; per];
                    read_at(old, &mut px, (s * stride) as u64)
                        .map_err(|e| format!("reading the image cache being updated: {e}"))?;
                    // A slot damaged on disk is decoded again rather than copied on.
                    if e.sum == Some(slot_sum(&px)) {
                        px
                    } else {
                        fresh(i)?
                    }
                }
                _ => fresh(i)?,
            };
            write_at(file, &pixels, (i * stride) as u64).map_err(|e| format!("writing the image cache: {e}"))?;
            Ok(slot_sum(&pixels))
        })
        .collect()
}

/// Writes a new data file of `n` slots through a temporary file that `fill` fills, then gives
/// it its final, unique name (a reader never sees a half-written one): that name, its path, and
/// `fill`'s result. A failure to read or write the cache itself is an error; an image's own
/// failure stays in its result.
fn write_data(
    dir: &Path,
    base: &str,
    n: usize,
    stride: usize,
    fill: impl FnOnce(&File) -> SlotResults,
) -> Result<(String, PathBuf, SlotResults)> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{base}-"))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in the image cache folder {}", dir.display()))?;
    tmp.as_file().set_len((n * stride) as u64)?;
    let results = fill(tmp.as_file());
    if let Some(e) = results.iter().find_map(|r| {
        r.as_ref()
            .err()
            .filter(|e| e.starts_with("writing the image cache") || e.starts_with("reading the image cache"))
    }) {
        anyhow::bail!("{}: {e}", dir.display());
    }
    tmp.as_file().sync_data()?;
    // Slots are image indices, so failed images leave a hole (sparse in the file system).
    let data_name = format!("{base}-{}.bin", generation());
    let data_path = dir.join(&data_name);
    tmp.persist(&data_path)
        .with_context(|| format!("writing {}", data_path.display()))?;
    Ok((data_name, data_path, results))
}

/// Writes `manifest` (atomically) and only then removes the `old` manifest's data file, when it
/// is another one: a reader of the old manifest finds its data until the new one is in place.
fn replace_manifest(dir: &Path, path: &Path, manifest: &Manifest, old: Option<&Manifest>) -> Result<()> {
    crate::files::write_atomic(path, &serde_json::to_vec(manifest)?)?;
    if let Some(m) = old {
        if m.data != manifest.data {
            let _ = std::fs::remove_file(dir.join(&m.data));
        }
    }
    Ok(())
}

/// A name unique to this build (time and process), so two runs building at once each keep a
/// whole data file.
fn generation() -> String {
    format!(
        "{:x}{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    )
}

/// The manifest's entries for the built data file: slot `i` for image `i`, or why it failed.
fn entries(origins: &[Origin], stamps: &[Result<Stamp, String>], results: &[Result<u64, String>]) -> Vec<Entry> {
    origins
        .iter()
        .zip(stamps)
        .zip(results)
        .enumerate()
        .filter_map(|(i, ((o, s), r))| {
            // An image whose file cannot even be read is not remembered: nothing to key it by.
            let stamp = *s.as_ref().ok()?;
            Some(Entry {
                file: o.file().to_path_buf(),
                member: o.member().map(str::to_string),
                stamp,
                slot: r.is_ok().then_some(i),
                sum: r.as_ref().ok().copied(),
                error: r.as_ref().err().cloned(),
            })
        })
        .collect()
}

/// The cache just built, opened, from each image's result (slot `i` for image `i`), with the
/// report of what was reused (`hits`), decoded and `dropped`.
fn built(
    path: PathBuf,
    stride: usize,
    results: SlotResults,
    manifest: PathBuf,
    hits: usize,
    dropped: usize,
) -> Result<Cached> {
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let bytes_on_disk = file.metadata()?.len();
    Ok(Cached {
        stride,
        path,
        sums: results.iter().map(|r| r.as_ref().ok().copied()).collect(),
        slots: results
            .iter()
            .enumerate()
            .map(|(i, r)| r.is_ok().then_some(i))
            .collect(),
        report: CacheReport {
            manifest,
            hits,
            built: results.len() - hits,
            dropped,
            bytes_on_disk,
        },
        errors: results.into_iter().map(|r| r.err()).collect(),
        file,
    })
}

/// The manifest, when it exists, parses, and matches this format and preprocessing.
fn read_manifest(path: &Path, size: usize, variant: &str, stride: usize) -> Option<Manifest> {
    let bytes = std::fs::read(path).ok()?;
    let m: Manifest = serde_json::from_slice(&bytes).ok()?;
    (m.format == FORMAT && m.size == size && m.variant == variant && m.stride == stride).then_some(m)
}

/// Fills `buf` from `file` at `offset` (a slot of the data file).
#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
pub(crate) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !bytes.is_empty() {
        let n = file.seek_write(bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}
