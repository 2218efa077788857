//! What a stage checked, printed for people and written as JSON for the pipeline.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was measured, or why it failed and what to try.
    pub detail: String,
}

/// Something measured or described that no threshold judges (the device's name, a step's
/// time): shown as `[info]` and never counted as a check, so a report never claims `[ok]` for
/// what could not have failed.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub name: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub stage: u8,
    pub name: String,
    pub passed: bool,
    pub checks: Vec<Check>,
    pub info: Vec<Info>,
    /// Numbers worth keeping (parameter counts, losses, timings …).
    pub metrics: Map<String, Value>,
    pub seconds: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Report {
    pub fn new(stage: u8, name: &str) -> Self {
        Self {
            stage,
            name: name.into(),
            passed: true,
            checks: vec![],
            info: vec![],
            metrics: Map::new(),
            seconds: 0.0,
            started: Some(Instant::now()),
        }
    }

    /// Records a check and prints it as it happens.
    pub fn check(&mut self, name: &str, passed: bool, detail: impl Into<String>) -> bool {
        let detail = detail.into();
        println!("  [{}] {name}: {detail}", if passed { "ok" } else { "FAIL" });
        self.passed &= passed;
        self.checks.push(Check {
            name: name.into(),
            passed,
            detail,
        });
        passed
    }

    /// Records and prints information that is not a check (see [`Info`]).
    pub fn info(&mut self, name: &str, detail: impl Into<String>) {
        let detail = detail.into();
        println!("  [info] {name}: {detail}");
        self.info.push(Info {
            name: name.into(),
            detail,
        });
    }

    pub fn metric(&mut self, key: &str, value: impl Serialize) {
        self.metrics
            .insert(key.into(), serde_json::to_value(value).unwrap_or(Value::Null));
    }

    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// Prints the verdict, writes the JSON report if asked, and returns the process exit code.
    pub fn finish(mut self, json: Option<&Path>) -> Result<std::process::ExitCode> {
        if let Some(t) = self.started {
            self.seconds = t.elapsed().as_secs_f64();
        }
        println!();
        if self.passed {
            println!(
                "stage {} ({}) PASSED: {} checks in {:.1}s",
                self.stage,
                self.name,
                self.checks.len(),
                self.seconds
            );
        } else {
            println!("stage {} ({}) FAILED:", self.stage, self.name);
            for c in self.failed_checks() {
                println!("  - {}: {}", c.name, c.detail);
            }
        }
        if let Some(path) = json {
            write_json_atomic(path, &self)?;
            println!("report: {}", path.display());
        }
        Ok(if self.passed {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        })
    }
}

/// Writes JSON via a temporary file and a rename, so a crash never leaves half a file.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    clip_core::files::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Formats 90724928 as "90,724,928".
pub fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
