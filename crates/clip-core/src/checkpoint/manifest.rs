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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub hash: String,
    pub files: BTreeMap<String, Vec<Sum>>,
}

impl Manifest {
    /// The manifest of `dir`; `None` when there is none (a folder written before checksums).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let corrupted = || format!("{} is corrupted: it is not a valid checksum manifest", path.display());
        let value: serde_json::Value = serde_json::from_str(&text).with_context(corrupted)?;
        // Another tool's manifest.json (an index's, a model hub's) is not ours to check against.
        if value.get("hash").and_then(|h| h.as_str()) != Some(HASH) {
            return Ok(None);
        }
        Ok(Some(serde_json::from_value(value).with_context(corrupted)?))
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// Checks `bytes`, read from `path`, against this manifest's entry for the file (if it has one).
    pub fn verify(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(accepted) = self.files.get(&name) else {
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
