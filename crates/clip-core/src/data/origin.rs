//! Where each image of a dataset comes from, so it can be stamped (for the image cache's key) and
//! decoded again at full resolution (for streaming and for augmentation from the original).
//!
//! An image is a file, or a member of a WebDataset tar shard, read in place at its byte offset
//! (the shard is never extracted).

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use image::{DynamicImage, ImageDecoder, ImageReader};

use super::{Dataset, Source};

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

    /// The image at full resolution, upright (EXIF orientation applied).
    pub fn decode(&self) -> Result<DynamicImage> {
        match self {
            Origin::File(p) => super::image::decode(p),
            Origin::Member { shard, offset, len, .. } => {
                let mut f = File::open(shard).with_context(|| format!("opening {}", shard.display()))?;
                f.seek(SeekFrom::Start(*offset))?;
                let mut bytes = vec![0u8; *len as usize];
                f.read_exact(&mut bytes)
                    .with_context(|| format!("reading {} bytes at {offset}", len))?;
                decode_bytes(&bytes)
            }
        }
    }
}

/// Decodes an image held in memory (format from its content), upright.
fn decode_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    let mut decoder = ImageReader::new(BufReader::new(Cursor::new(bytes)))
        .with_guessed_format()?
        .into_decoder()?;
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
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
