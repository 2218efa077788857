//! `cargo xtask bench search`: the exact f32 scan against the compact (int8) search and the
//! approximate one by k-means lists at 1,000,000 embeddings, and the int8 scan and the lists at
//! 10,000,000 when memory allows. The measuring is in clip-bench's `bench_search` (built in the
//! release profile with the other benchmarks); this runs it and passes its JSON lines through. Speed-ups are ratios
//! within one run (the exact scan is timed beside the others), so they hold on a busy machine
//! better than the times do. The HNSW graph is left out: building it over 1,000,000 embeddings
//! takes hours on two cores (`cargo run --release -p clip-bench --bin bench_search -- --n 200000
//! --big 0` measures it at 200,000).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Memory the 10M run needs: 2.5 GB of int8 codes, their copy in list order, a 1 GB chunk of
/// f32 rows, with room.
const BIG_RUN_BYTES: u64 = 8 << 30;

pub fn run(examples: &Path) -> Result<()> {
    let exe = examples.join("bench_search");
    let mut cmd = Command::new(&exe);
    cmd.arg("--no-graph");
    match available_memory() {
        Some(b) if b < BIG_RUN_BYTES => {
            eprintln!(
                "skipping the 10,000,000-embedding run: {:.1} GB of memory available, it needs {:.0}",
                b as f64 / 1e9,
                BIG_RUN_BYTES as f64 / 1e9
            );
            cmd.args(["--big", "0"]);
        }
        _ => {}
    }
    let status = cmd.status().with_context(|| format!("running {}", exe.display()))?;
    if !status.success() {
        bail!("the search benchmark failed");
    }
    Ok(())
}

/// MemAvailable from /proc/meminfo (Linux), in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
