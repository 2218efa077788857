//! `cargo xtask` — the project's own commands, in plain Rust.
//!
//! `cargo xtask verify` runs the four stages as one gated pipeline, each stage as its own binary
//! exactly as a user would run it, and stops at the first failing gate.

mod bench;
mod bench_search;
mod fashion;
mod verify;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("verify") => verify::run(&args[1..]),
        Some("fashion-mnist") => fashion::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{HELP}");
            Ok(true)
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

const HELP: &str = "\
cargo xtask TASK [OPTIONS]

Tasks:
  verify    Run stage 1 (build) → 2 (batch) → 3 (step) → 4 (train) as a gated pipeline on the
            demo set (or your data), stop at the first failing gate, then show the trained model
            in use (image → text, text → image). `cargo xtask verify --help` for its options.
  fashion-mnist
            Train on Fashion-MNIST (Debian package dataset-fashion-mnist) as class folders and
            report zero-shot test accuracy as one JSON line.
  bench     Speed as JSON lines: training steps against the PyTorch reference (a ratio), the
            data loader, and text → image search (exact, compact, approximate) over 1M and 10M
            embeddings.
";
