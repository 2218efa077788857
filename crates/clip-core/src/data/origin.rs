//! Where each image of a dataset comes from, so it can be stamped (for the image cache's key) and
//! decoded again at full resolution (for streaming and for augmentation from the original).
//!
//! An image is a file, or a member of a WebDataset tar shard, read in place at its byte offset
//! (the shard is never extracted).

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use image::DynamicImage;

use super::image::MAX_DECODE_BYTES;
use super::types::{Dataset, Source};

/// One image's original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    File(PathBuf),
    /// `len` bytes at `offset` of the tar shard `shard`, the member `name`.
    Member {
        shard: PathBuf,
        name: String,
        offset: u64,
        len: u64,
    },
}

/// What identifies a version of a file without reading it: its length and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stamp {
    pub len: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
}

impl Origin {
    /// The file holding the image (the shard for a member).
    pub fn file(&self) -> &std::path::Path {
        match self {
            Origin::File(p) => p,
            Origin::Member { shard, .. } => shard,
        }
    }

    /// The member name inside a shard, if any.
    pub fn member(&self) -> Option<&str> {
        match self {
            Origin::File(_) => None,
            Origin::Member { name, .. } => Some(name),
        }
    }

    /// `file` or `shard.tar:member`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Origin::File(p) => p.display().to_string(),
            Origin::Member { shard, name, .. } => format!("{}:{name}", shard.display()),
        }
    }

    /// Length and modification time of the file (of the whole shard for a member: a changed
    /// shard re-decodes all its members, since their offsets may have moved).
    pub fn stamp(&self) -> Result<Stamp> {
        let meta = std::fs::metadata(self.file()).with_context(|| format!("reading {}", self.file().display()))?;
        let (mtime_s, mtime_ns) = match meta.modified()?.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => (-(e.duration().as_secs() as i64), e.duration().subsec_nanos()),
        };
        Ok(Stamp {
            len: meta.len(),
            mtime_s,
            mtime_ns,
        })
    }

    /// xxh3-128 of the image's original bytes (the file, or the member's span of its shard), read
    /// in 1 MiB pieces: what an augmented view — a random crop of the original — depends on. A
    /// hash of the decoded, resized centre crop would miss an edit outside the centre.
    pub fn content_hash(&self) -> Result<[u8; 16]> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut f = File::open(self.file()).with_context(|| format!("opening {}", self.file().display()))?;
        let mut left = match self {
            Origin::File(_) => u64::MAX,
            Origin::Member { offset, len, .. } => {
                f.seek(SeekFrom::Start(*offset))?;
                *len
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = f
                .read(&mut buf[..want])
                .with_context(|| format!("reading {}", self.describe()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(h.digest128().to_le_bytes())
    }

    /// The image at full resolution, upright (EXIF orientation applied), under the limits of
    /// [`super::image::decode`]. A member's length comes from its tar header, which anyone can
    /// write: it is checked against the shard's real length and against [`MAX_DECODE_BYTES`]
    /// before a byte is allocated for it.
    pub fn decode(&self) -> Result<DynamicImage> {
        match self {
            Origin::File(p) => super::image::decode(p),
            Origin::Member { shard, offset, len, .. } => {
                let mut f = File::open(shard).with_context(|| format!("opening {}", shard.display()))?;
                let shard_len = f
                    .metadata()
                    .with_context(|| format!("reading {}", shard.display()))?
                    .len();
                check_span(*offset, *len, shard_len)?;
                f.seek(SeekFrom::Start(*offset))?;
                let mut bytes = vec![0u8; *len as usize];
                f.read_exact(&mut bytes)
                    .with_context(|| format!("reading {} bytes at {offset}", len))?;
                super::image::decode_reader(Cursor::new(bytes))
            }
        }
    }
}

/// Whether a member of `len` bytes at `offset` lies inside a shard of `shard_len` bytes and is
/// no larger than an image may be (its encoded bytes are never more than its decoded pixels).
pub(crate) fn check_span(offset: u64, len: u64, shard_len: u64) -> Result<()> {
    if len > MAX_DECODE_BYTES {
        anyhow::bail!(
            "image too large: its tar header says {len} bytes, more than the {} MiB an image may take",
            MAX_DECODE_BYTES >> 20
        );
    }
    if offset.checked_add(len).is_none_or(|end| end > shard_len) {
        anyhow::bail!(
            "its tar header says {len} bytes at offset {offset}, past the end of the shard ({shard_len} bytes): the shard is truncated or damaged"
        );
    }
    Ok(())
}

/// The origin of every image of `ds`, by image index.
pub(crate) fn origins(ds: &Dataset) -> Vec<Origin> {
    match &ds.source {
        Source::WebDataset { members, .. } => ds
            .images
            .iter()
            .zip(members)
            .map(|(e, m)| Origin::Member {
                shard: e.path.clone(),
                name: e.name.clone(),
                offset: m.offset,
                len: m.len,
            })
            .collect(),
        _ => ds.images.iter().map(|e| Origin::File(e.path.clone())).collect(),
    }
}
