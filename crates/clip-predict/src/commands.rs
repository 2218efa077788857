//! The command line's dispatch: each subcommand to the module that runs it (predict, search,
//! eval, export, serve), on the device and at the precision the global flags give.

use std::process::ExitCode;

use anyhow::Result;
use candle_core::Device;
use clip_core::data::Dataset;

use crate::model::default_index;
use crate::serve::{serve, ServeOptions};
use crate::{eval, export, predict, search};
use crate::{Cli, Cmd};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let device = clip_core::device::parse_device(&cli.device)?;
    // Before any model is loaded (a refused bf16 fails at once). fp32 unless --precision says
    // otherwise: the precision a run was trained in is not carried over to its use.
    clip_cli::activate_precision(cli.precision.unwrap_or_default(), &device)?;
    let json = cli.json;
    match cli.command {
        Cmd::ImageToText {
            model,
            images,
            texts,
            captions,
            top,
        } => predict::image_to_text(&model, &images, texts, captions.as_deref(), top, json, &device),
        Cmd::TextToImage {
            model,
            text,
            index,
            images,
            top,
            mode,
            sheet,
        } => search::text_to_image(
            &model,
            &text,
            index.as_deref(),
            images.as_deref(),
            top,
            mode,
            sheet.as_deref(),
            json,
            &device,
        ),
        Cmd::Index {
            model,
            images,
            out,
            batch_size,
            approx,
        } => search::index(&model, &images, out, batch_size, approx, json, &device),
        cmd @ Cmd::Serve { .. } => start_server(cmd, &device),
        Cmd::Eval {
            model,
            data,
            templates,
            confusion,
            batch_size,
            skip_bad,
        } => eval::eval(
            &model,
            &data,
            templates,
            confusion.as_deref(),
            batch_size,
            skip_bad,
            json,
            &device,
        ),
        Cmd::Export {
            model,
            format,
            out,
            overwrite,
            quantize,
            external_data,
        } => export::export(
            &model,
            format,
            &out,
            (overwrite, quantize, external_data),
            json,
            &device,
        ),
        Cmd::Demo { model, data } => predict::demo(&model, data.unwrap_or_else(Dataset::demo_dir).as_path(), &device),
    }
}

/// `serve`: the candidate captions and the index folder, then the server until it stops.
fn start_server(cmd: Cmd, device: &Device) -> Result<ExitCode> {
    let Cmd::Serve {
        model,
        index,
        addr,
        texts,
        texts_file,
        workers,
        allow_host,
        images,
    } = cmd
    else {
        unreachable!("start_server is given the serve command")
    };
    let texts = if texts.is_empty() && texts_file.is_none() {
        vec![]
    } else {
        predict::candidate_texts(texts, texts_file.as_deref())?
    };
    let index = match index {
        Some(i) => i,
        None => default_index(&model)?,
    };
    let opts = ServeOptions {
        model,
        index,
        addr,
        texts,
        workers,
        allow_hosts: allow_host,
        images,
    };
    serve(opts, device)?;
    Ok(ExitCode::SUCCESS)
}
