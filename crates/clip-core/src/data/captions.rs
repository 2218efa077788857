//! Captions files: one row per (image, caption), with a header naming the two columns.
//!
//! The same reader takes the common layouts of public datasets: CSV (Flickr8k's `captions.txt`,
//! the tutorial's `captions.csv`), TSV, Flickr30k's `|`-separated `results.csv`, and JSON Lines.
//! Rows are checked one by one, and each problem becomes a [`BadRow`] naming the file and line,
//! so one bad row never hides the others and never panics.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::types::{BadRow, CaptionFormat};

/// Header names accepted for the image column (compared trimmed and case-insensitively).
pub const IMAGE_COLUMNS: [&str; 4] = ["image", "image_name", "filename", "file"];
/// Header names accepted for the caption column.
pub const CAPTION_COLUMNS: [&str; 4] = ["caption", "text", "comment", "captions"];

/// One usable row: an image name as written and a trimmed, non-empty caption.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// 1-based line of the row in the file.
    pub line: usize,
    pub image: String,
    pub caption: String,
}

pub(crate) struct Parsed {
    pub format: CaptionFormat,
    pub rows: Vec<Row>,
    pub bad: Vec<BadRow>,
}

/// Reads a captions file. Errors are for the file as a whole (unreadable, no header); problems of
/// single rows are returned in `bad`.
pub(crate) fn read(path: &Path) -> Result<Parsed> {
    let bytes = std::fs::read(path).with_context(|| format!("reading captions file {}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(&bytes);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext == "jsonl" || ext == "ndjson" {
        Ok(read_json_lines(path, bytes))
    } else {
        read_delimited(path, bytes, &ext)
    }
}

/// Index of the first header name found in `names`, compared trimmed and case-insensitively.
fn find_column(header: &[String], names: &[&str]) -> Option<usize> {
    header.iter().position(|h| {
        let h = h.trim().trim_start_matches('\u{feff}').trim_matches('"').trim();
        names.contains(&h.to_lowercase().as_str())
    })
}

/// How a delimited file's rows read, as its header says: the separator, and where the image and
/// caption columns are among how many.
struct Layout {
    delimiter: u8,
    format: CaptionFormat,
    image_col: usize,
    caption_col: usize,
    n_fields: usize,
}

/// The layout of a delimited file from its first line: the separator that yields both an image
/// and a caption column. An error (the file as a whole cannot be read) when none does.
fn header_layout(path: &Path, bytes: &[u8], ext: &str) -> Result<Layout> {
    let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first_line = std::str::from_utf8(first_line)
        .map_err(|_| {
            anyhow::anyhow!(
                "{}:1: the header is not valid UTF-8: save the file as UTF-8",
                path.display()
            )
        })?
        .trim_end_matches('\r');
    // The extension suggests the separator; the header decides: the separator that yields both an
    // image and a caption column wins.
    let mut candidates = match ext {
        "tsv" => vec![(b'\t', CaptionFormat::Tsv)],
        _ => vec![(b',', CaptionFormat::Csv)],
    };
    candidates.extend([
        (b',', CaptionFormat::Csv),
        (b'\t', CaptionFormat::Tsv),
        (b'|', CaptionFormat::Pipe),
    ]);
    let Some(layout) = candidates.into_iter().find_map(|(d, f)| {
        let header: Vec<String> = first_line.split(d as char).map(str::to_string).collect();
        Some(Layout {
            delimiter: d,
            format: f,
            image_col: find_column(&header, &IMAGE_COLUMNS)?,
            caption_col: find_column(&header, &CAPTION_COLUMNS)?,
            n_fields: header.len(),
        })
    }) else {
        bail!(
            "{}:1: the header {first_line:?} must name an image column ({}) and a caption column ({}), separated by commas, tabs or |",
            path.display(),
            IMAGE_COLUMNS.join(", "),
            CAPTION_COLUMNS.join(", ")
        );
    };
    Ok(layout)
}

/// Reads a CSV, TSV or `|`-separated file whose header [`header_layout`] reads; each row is
/// checked on its own, so a bad one becomes a [`BadRow`] and the next is still read.
fn read_delimited(path: &Path, bytes: &[u8], ext: &str) -> Result<Parsed> {
    let Layout {
        delimiter,
        format,
        image_col,
        caption_col,
        n_fields,
    } = header_layout(path, bytes, ext)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes);
    let mut rows = vec![];
    let mut bad = vec![];
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                bad.push(BadRow::new(path, line, format!("unreadable row: {e}")));
                continue;
            }
        }
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        // Lines of only whitespace (a trailing blank line with spaces) are not rows.
        if record.iter().all(|f| f.trim_ascii().is_empty()) {
            continue;
        }
        if record.len() != n_fields {
            let hint = if record.len() > n_fields {
                ": is there an unquoted separator in the caption? quote it"
            } else {
                ""
            };
            bad.push(BadRow::new(
                path,
                line,
                format!(
                    "expected {n_fields} fields as in the header, found {}{hint}",
                    record.len()
                ),
            ));
            continue;
        }
        let field = |i: usize| std::str::from_utf8(&record[i]).map(|s| s.trim().to_string());
        let (Ok(image), Ok(caption)) = (field(image_col), field(caption_col)) else {
            bad.push(BadRow::new(path, line, "invalid UTF-8: save the file as UTF-8"));
            continue;
        };
        push_row(path, line, image, caption, &mut rows, &mut bad);
    }
    Ok(Parsed { format, rows, bad })
}

fn push_row(path: &Path, line: usize, image: String, caption: String, rows: &mut Vec<Row>, bad: &mut Vec<BadRow>) {
    if image.is_empty() {
        bad.push(BadRow::new(path, line, "empty image name"));
    } else if caption.is_empty() {
        bad.push(BadRow::new(path, line, format!("empty caption for {image}")));
    } else {
        rows.push(Row { line, image, caption });
    }
}

/// JSON Lines: `{"image": "a.jpg", "caption": "…"}` per line; a caption may also be a list of
/// strings (one pair each). Blank lines are skipped.
fn read_json_lines(path: &Path, bytes: &[u8]) -> Parsed {
    let mut rows = vec![];
    let mut bad = vec![];
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let Ok(text) = std::str::from_utf8(raw) else {
            bad.push(BadRow::new(path, line, "invalid UTF-8: save the file as UTF-8"));
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let obj = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                bad.push(BadRow::new(
                    path,
                    line,
                    "expected a JSON object such as {\"image\": \"a.jpg\", \"caption\": \"…\"}",
                ));
                continue;
            }
            Err(e) => {
                bad.push(BadRow::new(path, line, format!("invalid JSON: {e}")));
                continue;
            }
        };
        let get = |names: &[&str]| {
            obj.iter()
                .find(|(k, _)| names.contains(&k.trim().to_lowercase().as_str()))
                .map(|(_, v)| v)
        };
        let image = match get(&IMAGE_COLUMNS) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(_) => {
                bad.push(BadRow::new(path, line, "the image field must be a string"));
                continue;
            }
            None => {
                bad.push(BadRow::new(
                    path,
                    line,
                    format!("no image field (one of {})", IMAGE_COLUMNS.join(", ")),
                ));
                continue;
            }
        };
        match get(&CAPTION_COLUMNS) {
            Some(Value::String(s)) => push_row(path, line, image, s.trim().to_string(), &mut rows, &mut bad),
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
                for s in items.iter().filter_map(Value::as_str) {
                    push_row(path, line, image.clone(), s.trim().to_string(), &mut rows, &mut bad);
                }
            }
            Some(_) => bad.push(BadRow::new(
                path,
                line,
                "the caption field must be a string or a list of strings",
            )),
            None => bad.push(BadRow::new(
                path,
                line,
                format!("no caption field (one of {})", CAPTION_COLUMNS.join(", ")),
            )),
        }
    }
    Parsed {
        format: CaptionFormat::JsonLines,
        rows,
        bad,
    }
}
