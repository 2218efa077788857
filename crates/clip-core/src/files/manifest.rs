//! `manifest.json`: the size and xxh3-128 hash of each checkpoint file in a folder.
//!
//! safetensors checks its header but not the tensor bytes, so a flipped bit in a weight would load
//! silently; the manifest lets every read verify the whole file. A file may have more than one
//! accepted version while a group of files is being replaced (see
//! [`super::write_checked`]), so a crash between two renames leaves every file verifiable.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The manifest's file name, in every checkpoint folder (the run folder, `last/`).
pub const MANIFEST: &str = "manifest.json";

/// The manifest's `hash` field: which hash its sums are.
pub const HASH: &str = "xxh3-128";

/// The manifest's `version`: 2 lists every file of its folder, so a file it does not list is an
/// error; 1 (runs written before every file was covered) listed only the weights and optimiser
/// state, so another file read from such a folder is read unverified, with a warning.
pub const VERSION: u32 = 2;

fn version_1() -> u32 {
    1
}

/// Size and hash of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sum {
    pub bytes: u64,
    /// xxh3-128 of the whole file, hexadecimal.
    #[serde(with = "hex128")]
    pub xxh3: u128,
}

impl Sum {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            xxh3: xxhash_rust::xxh3::xxh3_128(bytes),
        }
    }
}

/// Accepted versions of each file by name: the first is the current one, the others are accepted
/// only while a write is in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub hash: String,
    #[serde(default = "version_1")]
    pub version: u32,
    pub files: BTreeMap<String, Vec<Sum>>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self {
            hash: HASH.into(),
            version: VERSION,
            files: BTreeMap::new(),
        }
    }
}

impl Manifest {
    /// The manifest of `dir`; `None` when there is none (a folder written before checksums). A
    /// manifest whose hash this build does not know is an error: its sums cannot be checked.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let corrupted = || format!("{} is corrupted: it is not a valid checksum manifest", path.display());
        let value: serde_json::Value = serde_json::from_str(&text).with_context(corrupted)?;
        match value.get("hash") {
            Some(serde_json::Value::String(h)) if h == HASH => {}
            Some(h) => bail!(
                "{} records its checksums with hash {h}, which this build cannot check (it knows {HASH}): the files it covers cannot be verified",
                path.display()
            ),
            None => bail!(
                "{} names no hash: it is not a checksum manifest (damaged, or another tool's) — the files it should cover cannot be verified",
                path.display()
            ),
        }
        let m: Self = serde_json::from_value(value).with_context(corrupted)?;
        if m.version > VERSION {
            bail!(
                "{} has version {}, newer than this build reads ({VERSION}): update clipmine",
                path.display(),
                m.version
            );
        }
        Ok(Some(m))
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// Checks `bytes`, read from `path`, against this manifest's entry for the file. A file it
    /// does not list is an error in a version-2 manifest (which lists every file of its folder),
    /// and is read with a warning from an older one.
    pub fn verify(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(accepted) = self.files.get(&name) else {
            if self.version >= 2 {
                bail!(
                    "{} is not listed in its folder's {MANIFEST}, so it cannot be verified: it was not written by this run (copied in?), or the manifest is damaged",
                    path.display()
                );
            }
            eprintln!(
                "warning: {} is read unverified: its folder's {MANIFEST} was written before every file of a run was checksummed",
                path.display()
            );
            return Ok(());
        };
        let got = Sum::of(bytes);
        if accepted.contains(&got) {
            return Ok(());
        }
        let want = accepted.first().copied().unwrap_or(got);
        if accepted.iter().all(|s| s.bytes != got.bytes) {
            bail!(
                "{} is damaged: it has {} bytes but {MANIFEST} records {} (truncated or partly overwritten) — restore it from a copy, or resume from the run's last/ checkpoint",
                path.display(),
                got.bytes,
                want.bytes
            );
        }
        bail!(
            "{} is damaged: checksum mismatch (xxh3-128 {:032x}, {MANIFEST} records {:032x}; same size, so some bytes changed on disk) — restore it from a copy, or resume from the run's last/ checkpoint",
            path.display(),
            got.xxh3,
            want.xxh3
        )
    }
}

mod hex128 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}
