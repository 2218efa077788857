//! `cargo xtask bench data`: datasets larger than memory. Runs clip-core's `bench_data` example
//! (see its documentation): N synthetic 224 px JPEGs, the image cache's first start against its
//! second (a cache hit), peak resident memory of a loader epoch over the cache, and the loader's
//! headroom (cached, streaming, streaming with augmentation) over `simple-clip` training steps.
//! Not part of `cargo xtask bench` without arguments: at the default 200,000 images the first
//! start alone decodes for minutes; `--images N` makes it smaller.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

pub fn run(examples: &Path, images: usize) -> Result<()> {
    let status = Command::new(examples.join("bench_data"))
        .args(["--images", &images.to_string()])
        .status()?;
    if !status.success() {
        bail!("the data benchmark failed");
    }
    Ok(())
}
