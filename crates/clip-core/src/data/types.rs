//! The plain types of a dataset — images, pairs, bad rows, where they came from — with no
//! behaviour beyond formatting: the readers (captions files, class folders, WebDataset shards)
//! produce them, and everything above reads them.

use std::fmt;
use std::path::{Path, PathBuf};

/// The caption of a class-folder image when no template is given.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {label}";
/// Captions files looked for, in this order, when a dataset is given as a folder.
pub const CAPTION_FILES: [&str; 4] = ["captions.csv", "captions.tsv", "captions.txt", "captions.jsonl"];

/// An image file used by one or more pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Absolute path.
    pub path: PathBuf,
    /// As written in the captions file, or `label/file.jpg` for class folders.
    pub name: String,
}

/// One training example: an image and one of its captions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Index into [`Dataset::images`].
    pub image: usize,
    pub caption: String,
    /// Index into [`Dataset::labels`] (class folders only), kept for zero-shot evaluation.
    pub label: Option<usize>,
    /// 1-based line in the captions file; 0 for class folders.
    pub line: usize,
}

/// A row (or image) that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The captions file, or the image itself for class folders.
    pub file: PathBuf,
    /// 1-based line in `file`; 0 when the problem is a whole file (class-folder images).
    pub line: usize,
    pub reason: String,
}

impl BadRow {
    pub fn new(file: &Path, line: usize, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
}

/// `FILE:LINE: reason` (or `FILE: reason` when there is no line), as compilers write it, so
/// editors and terminals can jump to the row.
impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.reason),
            n => write!(f, "{}:{n}: {}", self.file.display(), self.reason),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Leave bad rows out (they are listed in [`Dataset::bad`]) instead of failing.
    pub skip_bad: bool,
    /// Caption templates for class folders; `{label}` is replaced by the folder name.
    pub templates: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            skip_bad: false,
            templates: vec![DEFAULT_TEMPLATE.to_string()],
        }
    }
}

/// Where the pairs came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Captions {
        file: PathBuf,
        format: CaptionFormat,
    },
    ClassFolders {
        templates: Vec<String>,
    },
    /// A folder of images and no captions: each image is a pair with an empty caption. Such
    /// data teaches only an image tower, from a teacher's image embeddings (see
    /// [`Dataset::captionless`]).
    Images,
    /// WebDataset tar shards; image i is the member at `members[i]` of its shard.
    WebDataset {
        shards: Vec<PathBuf>,
        members: Vec<MemberSpan>,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Captions { file, format } => {
                write!(f, "{format} captions file {}", file.display())
            }
            Source::ClassFolders { templates } => {
                write!(f, "class folders, captions from {templates:?}")
            }
            Source::Images => write!(f, "images without captions"),
            Source::WebDataset { shards, .. } => match shards.as_slice() {
                [one] => write!(f, "WebDataset shard {}", one.display()),
                [first, .., last] => write!(
                    f,
                    "{} WebDataset shards, {} … {}",
                    shards.len(),
                    first.display(),
                    last.display()
                ),
                [] => write!(f, "no WebDataset shards"),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// The dataset's folder (absolute): the captions file's folder, or the class folders' parent.
    pub root: PathBuf,
    /// The folder image names are resolved against first (`root/images` when it exists).
    pub image_root: PathBuf,
    pub source: Source,
    pub images: Vec<ImageEntry>,
    pub pairs: Vec<Pair>,
    /// Class names (class folders only), sorted; [`Pair::label`] indexes them.
    pub labels: Vec<String>,
    /// Rows left out (only non-empty with [`LoadOptions::skip_bad`]).
    pub bad: Vec<BadRow>,
}

/// How a captions file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionFormat {
    Csv,
    Tsv,
    /// `|`-separated, as Flickr30k's `results.csv`.
    Pipe,
    JsonLines,
}

impl fmt::Display for CaptionFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptionFormat::Csv => "CSV",
            CaptionFormat::Tsv => "TSV",
            CaptionFormat::Pipe => "|-separated",
            CaptionFormat::JsonLines => "JSON Lines",
        })
    }
}

/// Where an image member's bytes are in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSpan {
    pub offset: u64,
    pub len: u64,
}

/// At most this many bad rows are listed in an error; the total is always given.
pub(crate) const MAX_LISTED: usize = 10;

/// "\n  FILE:LINE: reason …\n  … and 2 more" for an error message.
pub(crate) fn list_bad(bad: &[BadRow]) -> String {
    if bad.is_empty() {
        return String::new();
    }
    format!("\n  {}", crate::listing::first_n(bad, MAX_LISTED, "\n  "))
}
