//! `cargo xtask` — the project's own commands, in plain Rust.
//!
//! `cargo xtask verify` runs the four stages as one gated pipeline, each stage as its own binary
//! exactly as a user would run it, and stops at the first failing gate.
//!
//! Exit status: 0 when everything ran and passed, 1 when a gate failed, 2 on an error (a bad
//! flag, a build that failed, a program that could not run).

mod bench;
mod bench_data;
mod bench_search;
mod fashion;
mod idx;
mod parity;
mod ui_check;
mod verify;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// The project's own commands: the gated pipeline, a real dataset end to end, benchmarks.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    after_help = "Examples:\n  cargo xtask verify                      the whole pipeline on the demo set, CPU\n  cargo xtask verify --data ~/photos/herbs --from 4 --epochs 80\n  cargo xtask fashion-mnist               class folders → stage 4 → zero-shot eval\n  cargo xtask bench train                 training steps against the PyTorch reference\n  cargo xtask ui-check                    report.html (and the search page) in headless Chromium\n\n`cargo xtask TASK --help` for a task's options.\nExit status: 0 passed, 1 a gate failed, 2 an error."
)]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    Verify(verify::Args),
    FashionMnist(fashion::Args),
    Bench(bench::Args),
    Parity(parity::Args),
    UiCheck(ui_check::Args),
}

fn main() -> ExitCode {
    // Bad flags: clap prints the error with a usage line and exits with status 2, as errors do here.
    let cli = Cli::parse();
    let result = match cli.task {
        Some(Task::Verify(a)) => verify::run(a),
        Some(Task::FashionMnist(a)) => fashion::run(a),
        Some(Task::Bench(a)) => bench::run(a),
        Some(Task::Parity(a)) => parity::run(a),
        Some(Task::UiCheck(a)) => ui_check::run(a),
        None => Cli::command()
            .print_long_help()
            .map(|()| true)
            .map_err(anyhow::Error::from),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_task_shows_the_help_and_unknown_ones_are_errors() {
        assert!(Cli::try_parse_from(["xtask"]).unwrap().task.is_none());
        let e = Cli::try_parse_from(["xtask", "nope"]).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["xtask", "verify", "--help"]).err().unwrap();
        assert_eq!(e.exit_code(), 0);
        assert!(e.to_string().contains("--skip-bad"), "{e}");
    }
}
