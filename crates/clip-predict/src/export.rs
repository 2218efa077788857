//! `export`: the model as an open_clip or Hugging Face folder, or as ONNX graphs.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::Device;
use clip_core::run_dir::RunDir;

use crate::model::{load, Origin};
use crate::ModelChoice;

/// Writes the model as an open_clip or Hugging Face folder (or ONNX graphs) and says how to load it.
pub(crate) fn export(
    choice: &ModelChoice,
    format: clip_core::export::ExportFormat,
    out: &Path,
    (overwrite, quantize, external_data): (bool, Option<clip_core::export::onnx::Quantize>, bool),
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    if (quantize.is_some() || external_data) && format != clip_core::export::ExportFormat::Onnx {
        anyhow::bail!(
            "{} applies to --format onnx only",
            if external_data {
                "--external-data"
            } else {
                "--quantize int8"
            }
        );
    }
    // Refused from the config alone before anything is loaded (a student distilled on images
    // alone would otherwise open its teacher first).
    // Nor may OUT be, or lie inside, the folder the model is read from (--overwrite would
    // replace the model itself).
    if let Some(run) = &choice.run {
        clip_core::export::check_out(out, &[("the run folder", run)])?;
        let cfg = RunDir::open(run)?.config()?;
        clip_core::export::exportable(&cfg, format).with_context(|| format!("exporting --run {}", run.display()))?;
    }
    let m = load(choice, device)?;
    if let Origin::Checkpoint { load, .. } = &m.origin {
        let folders: Vec<(&str, &Path)> = [&load.config_file, &load.weights_file]
            .into_iter()
            .filter_map(|f| f.parent())
            .map(|d| ("the folder the model is read from,", d))
            .collect();
        clip_core::export::check_out(out, &folders)?;
    }
    // A student distilled on images alone: its captions are its teacher's to embed.
    let options = clip_core::export::Options {
        overwrite,
        captions_by: m.captions_by.as_ref().map(|t| (&t.model, &t.tokenizer)),
        quantize,
        external_data,
    };
    let e = clip_core::export::export_with(&m.model, &m.tok, format, out, options)
        .with_context(|| format!("exporting {}", m.flag()))?;
    say(&e, &m.flag(), format, out, json);
    Ok(ExitCode::SUCCESS)
}

/// What was written, and how to load it: one JSON object, or lines for a person.
fn say(e: &clip_core::export::Exported, flag: &str, format: clip_core::export::ExportFormat, out: &Path, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "layout": e.layout,
                "out": out.display().to_string(),
                "tensors": e.tensors,
                "files": e.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                "python": e.python,
            })
        );
    } else {
        println!(
            "exported {} as {} ({} tensors) to {}:",
            flag,
            e.layout,
            e.tensors,
            out.display()
        );
        for f in &e.files {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            println!("  {} ({:.1} MB)", f.display(), size as f64 / 1e6);
        }
        println!(
            "load it in Python:\n{}",
            e.python
                .lines()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if format != clip_core::export::ExportFormat::Onnx {
            println!(
                "or here: clip-predict image-to-text --model {} …",
                clip_cli::args::shell_quoted(&out.display().to_string())
            );
        }
    }
}
