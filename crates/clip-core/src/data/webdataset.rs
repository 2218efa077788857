//! WebDataset input: tar shards as img2dataset writes them (`00000.tar` holding `key.jpg` with
//! `key.txt` or `key.json`), the format of the open_clip world.
//!
//! `--data` names them as a brace pattern (`shards/{00000..00099}.tar`), one `.tar` file, or a
//! folder of `.tar` files. Each shard is read once, sequentially, with the `tar` crate: captions
//! are read then, images only located (their byte offset and length), and decoded later straight
//! from the shard (into the image cache, or per batch when streaming) — nothing is extracted to
//! disk. A sample is all members sharing a key (the name up to its first dot, as WebDataset
//! does); a caption comes from `key.txt`, else from the `caption` or `text` field of `key.json`.
//! A member that cannot be used is reported like a bad row, as `shard.tar:member: reason`.
//!
//! Every sample has one image, so the usual split by image holds out whole keys, chosen by the
//! seed alone: the same keys on every run.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::image::IMAGE_EXTENSIONS;
use super::origin::check_span;
use super::paths::absolute;
use super::types::{BadRow, Dataset, ImageEntry, MemberSpan, Pair, Source, CAPTION_FILES};

/// The shards `path` names, or `None` when it is not WebDataset input: a pattern with braces, a
/// `.tar` file, or a folder holding `.tar` files and no captions file.
pub(crate) fn shards(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let text = path.to_string_lossy();
    if text.contains('{') && !path.exists() {
        let names = expand_braces(&text)?;
        let missing: Vec<&String> = names.iter().filter(|n| !Path::new(n).is_file()).collect();
        if !missing.is_empty() {
            bail!(
                "{text}: {} of {} shards not found: {}",
                missing.len(),
                names.len(),
                crate::listing::first_n(&missing, 5, ", ")
            );
        }
        return Ok(Some(names.into_iter().map(PathBuf::from).collect()));
    }
    let is_tar = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("tar"))
    };
    if path.is_file() && is_tar(path) {
        return Ok(Some(vec![path.to_path_buf()]));
    }
    if path.is_dir() && !CAPTION_FILES.iter().any(|n| path.join(n).is_file()) {
        let mut tars: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_tar(p))
            .collect();
        tars.sort();
        if !tars.is_empty() {
            return Ok(Some(tars));
        }
    }
    Ok(None)
}

/// The most names one brace pattern may expand to, all groups together: a few hundred thousand
/// shards is already a very large dataset, and each name costs memory before any shard is opened.
pub const MAX_BRACE_NAMES: u64 = 1_000_000;

/// One `{…}` group of a pattern: a numeric range or a list of alternatives.
enum Group<'a> {
    Range { from: u64, to: u64, width: usize },
    List(Vec<&'a str>),
}

impl Group<'_> {
    fn len(&self) -> u64 {
        match self {
            Group::Range { from, to, .. } => to - from + 1,
            Group::List(l) => l.len() as u64,
        }
    }

    fn get(&self, i: u64) -> String {
        match self {
            Group::Range { from, width, .. } => format!("{:0width$}", from + i),
            Group::List(l) => l[i as usize].to_string(),
        }
    }
}

/// Shell-style brace expansion: `{00000..00099}` (numeric range, zero-padded to the width of
/// its first bound when that starts with 0) and `{a,b,c}` (alternatives), several per pattern.
///
/// The number of names is the product of the groups' sizes; it is counted before any name is
/// made and refused above [`MAX_BRACE_NAMES`], so `{0..9999999}{0..9999999}` is an error in
/// microseconds rather than an exhausted memory.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    // Literal text and groups, alternating: lit0 {g0} lit1 {g1} … litN.
    let mut literals = vec![];
    let mut groups = vec![];
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(len) = rest[open..].find('}') else {
            bail!("{pattern}: a `{{` without its `}}`");
        };
        let body = &rest[open + 1..open + len];
        literals.push(&rest[..open]);
        groups.push(if let Some((a, b)) = body.split_once("..") {
            let bad = || anyhow::anyhow!("{pattern}: {{{body}}} is not a range of numbers like {{00000..00099}}");
            let (from, to): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if from > to {
                bail!("{pattern}: the range {{{body}}} runs backwards");
            }
            if to - from >= MAX_BRACE_NAMES {
                bail!("{pattern}: the range {{{body}}} names more than {MAX_BRACE_NAMES} shards");
            }
            let width = if a.starts_with('0') { a.len() } else { 0 };
            Group::Range { from, to, width }
        } else {
            Group::List(body.split(',').collect())
        });
        rest = &rest[open + len + 1..];
    }
    literals.push(rest);
    let total = groups.iter().try_fold(1u64, |n, g| n.checked_mul(g.len()));
    match total {
        Some(n) if n <= MAX_BRACE_NAMES => {}
        _ => bail!(
            "{pattern}: the pattern names {} shards in all (the product of its groups' sizes: {}), more than the {MAX_BRACE_NAMES} allowed — name fewer shards, or a folder of .tar files",
            total.map_or_else(|| "over 18 quintillion".to_string(), |n| n.to_string()),
            groups.iter().map(|g| g.len().to_string()).collect::<Vec<_>>().join(" × ")
        ),
    }
    // Odometer order: the last group changes fastest, as the shell expands.
    let mut names = Vec::with_capacity(total.unwrap_or(0) as usize);
    let mut digit = vec![0u64; groups.len()];
    loop {
        let mut name = String::from(literals[0]);
        for (k, g) in groups.iter().enumerate() {
            name.push_str(&g.get(digit[k]));
            name.push_str(literals[k + 1]);
        }
        names.push(name);
        let mut k = groups.len();
        loop {
            if k == 0 {
                return Ok(names);
            }
            k -= 1;
            digit[k] += 1;
            if digit[k] < groups[k].len() {
                break;
            }
            digit[k] = 0;
        }
    }
}

/// What one key of a shard holds.
#[derive(Default)]
struct Sample {
    image: Option<(String, MemberSpan)>,
    /// An image member that cannot be used (its header claims more than the shard holds, or more
    /// than an image may take): its name and why.
    bad_image: Option<(String, String)>,
    txt: Option<std::result::Result<String, String>>,
    json: Option<std::result::Result<String, String>>,
    /// Any member of the key, for messages.
    first: String,
}

fn member_bad(shard: &Path, member: &str, reason: impl Into<String>) -> BadRow {
    BadRow::new(Path::new(&format!("{}:{member}", shard.display())), 0, reason)
}

/// Reads a caption member: UTF-8 text, trimmed.
fn read_text(entry: &mut impl Read) -> std::result::Result<String, String> {
    let mut bytes = vec![];
    entry.read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()))
}

/// The caption of a `.json` member: its `caption` field, else its `text` field.
fn json_caption(text: &str) -> std::result::Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    ["caption", "text"]
        .iter()
        .find_map(|k| v.get(k).and_then(|c| c.as_str()))
        .map(|c| c.trim().to_string())
        .ok_or_else(|| "no string field `caption` or `text`".to_string())
}

/// The rows of WebDataset shards, read in order, with the members that cannot be used in
/// [`Dataset::bad`] (the caller checks them: [`Dataset::load`]).
pub(crate) fn read(shards: Vec<PathBuf>) -> Result<Dataset> {
    let shards: Vec<PathBuf> = shards.iter().map(|s| absolute(s)).collect::<Result<_>>()?;
    let mut images = vec![];
    let mut members = vec![];
    let mut pairs = vec![];
    let mut bad = vec![];
    for shard in &shards {
        let samples = match read_shard(shard, &mut bad) {
            Ok(s) => s,
            Err(e) => {
                bad.push(BadRow::new(shard, 0, format!("{e:#}")));
                continue;
            }
        };
        for s in samples {
            let caption = match (s.txt, s.json) {
                (Some(t), _) => t,
                (None, Some(j)) => j,
                (None, None) => Err("no caption (key.txt, or key.json with a `caption` or `text` field)".into()),
            };
            if let (None, Some((name, why))) = (&s.image, &s.bad_image) {
                bad.push(member_bad(shard, name, why.clone()));
                continue;
            }
            let Some((name, span)) = s.image else {
                bad.push(member_bad(
                    shard,
                    &s.first,
                    "a caption without an image (key.jpg|png|webp)",
                ));
                continue;
            };
            match caption {
                Ok(c) if c.is_empty() => bad.push(member_bad(shard, &name, "empty caption")),
                Ok(caption) => {
                    pairs.push(Pair {
                        image: images.len(),
                        caption,
                        label: None,
                        line: 0,
                    });
                    images.push(ImageEntry {
                        path: shard.clone(),
                        name,
                    });
                    members.push(span);
                }
                Err(reason) => bad.push(member_bad(shard, &name, reason)),
            }
        }
    }
    let root = shards
        .first()
        .and_then(|s| s.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(Dataset {
        image_root: root.clone(),
        root,
        source: Source::WebDataset { shards, members },
        images,
        pairs,
        labels: vec![],
        bad,
    })
}

/// The samples of one shard, in the order their keys first appear. Members that are neither
/// images nor captions are ignored; unreadable captions are kept as errors for their sample.
fn read_shard(shard: &Path, bad: &mut Vec<BadRow>) -> Result<Vec<Sample>> {
    let file = File::open(shard).with_context(|| format!("opening {}", shard.display()))?;
    let shard_len = file
        .metadata()
        .with_context(|| format!("reading {}", shard.display()))?
        .len();
    let mut archive = tar::Archive::new(file);
    let mut order: Vec<String> = vec![];
    let mut samples: HashMap<String, Sample> = HashMap::new();
    let mut last = String::from("(the start)");
    let entries = archive
        .entries_with_seek()
        .with_context(|| format!("{}: not a tar archive", shard.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("a broken tar header after member {last}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        last = name.clone();
        let base_start = name.rfind('/').map_or(0, |i| i + 1);
        let Some(dot) = name[base_start..].find('.').map(|d| base_start + d) else {
            continue;
        };
        let (key, ext) = (name[..dot].to_string(), name[dot + 1..].to_ascii_lowercase());
        let sample = samples.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            Sample {
                first: name.clone(),
                ..Sample::default()
            }
        });
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            if sample.image.is_some() {
                bad.push(member_bad(shard, &name, "a second image for the same key (ignored)"));
                continue;
            }
            let span = MemberSpan {
                offset: entry.raw_file_position(),
                len: entry.size(),
            };
            // The header's size is the writer's word: checked here, so nothing later allocates it.
            if let Err(e) = check_span(span.offset, span.len, shard_len) {
                sample.bad_image = Some((name, format!("{e:#}")));
                continue;
            }
            sample.image = Some((name, span));
        } else if ext == "txt" {
            sample.txt = Some(read_text(&mut entry).map_err(|e| format!("{name}: {e}")));
        } else if ext == "json" {
            sample.json = Some(
                read_text(&mut entry)
                    .and_then(|t| json_caption(&t))
                    .map_err(|e| format!("{name}: {e}")),
            );
        }
    }
    Ok(order.into_iter().filter_map(|k| samples.remove(&k)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_and_lists() {
        assert_eq!(
            expand_braces("s/{00008..00011}.tar").unwrap(),
            ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
        );
        assert_eq!(expand_braces("{a,b}-{1..2}").unwrap(), ["a-1", "a-2", "b-1", "b-2"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("s/{3..1}.tar").is_err());
        assert!(expand_braces("s/{x..y}.tar").is_err());
        assert!(expand_braces("s/{0.tar").is_err());
    }

    #[test]
    fn the_product_of_ranges_is_capped_before_anything_is_made() {
        let t = std::time::Instant::now();
        let err = format!("{:#}", expand_braces("s/{0..9999999}{0..9999999}.tar").unwrap_err());
        assert!(err.contains("more than 1000000 shards"), "{err}");
        let err = format!("{:#}", expand_braces("s/{0..999999}{0..999999}.tar").unwrap_err());
        assert!(t.elapsed() < std::time::Duration::from_millis(100), "{:?}", t.elapsed());
        assert!(
            err.contains("1000000000000 shards in all") && err.contains("1000000 × 1000000"),
            "{err}"
        );
        let err = format!("{:#}", expand_braces("{0..999}{0..999}{0,1}").unwrap_err());
        assert!(err.contains("2000000 shards in all"), "{err}");
        // One range alone is capped too, and a product at the cap is fine.
        assert!(expand_braces("{0..1000000}").is_err());
        assert_eq!(expand_braces("{0..999}{0..999}").unwrap().len(), 1_000_000);
    }
}
