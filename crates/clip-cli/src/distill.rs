//! What stages 1 and 4 print about a distillation teacher and the weights a student inherits.

use anyhow::Result;
use candle_core::Device;
use clip_core::distill::{Inherited, Teacher};
use clip_core::ClipConfig;

/// The teacher the config names, loaded and described (`None`: no `[distill] teacher`). A
/// teacher `recorded` in a run folder (a resume without `--teacher`) is read from this machine
/// only — a local folder, or the Hub cache — never downloaded because a run folder names it.
pub fn open_teacher(cfg: &ClipConfig, dev: &Device, recorded: bool) -> Result<Option<Teacher>> {
    let Some(spec) = &cfg.distill.teacher else {
        return Ok(None);
    };
    let t = if recorded {
        let offline = clip_core::hub::Hub::new(clip_core::hub::Hub::from_env().cache_dir(), true).with_progress(false);
        Teacher::open_with(spec, &offline, dev).map_err(|e| {
            e.context(format!(
                "the teacher {spec} this run records is read from this machine only (a run folder never makes clipmine download a model): pass --teacher to name it yourself"
            ))
        })?
    } else {
        Teacher::open(spec, dev)?
    };
    println!(
        "teacher: {} ({:.1} M parameters, {}-dimensional embeddings, logit scale {:.1})",
        t.describe,
        t.params() as f64 / 1e6,
        t.model.embed_dim(),
        t.logit_scale()?
    );
    Ok(Some(t))
}

/// What the student took from the teacher (TinyCLIP's weight inheritance), tower by tower.
pub fn print_inherited(inh: &Inherited) {
    if inh.towers.is_empty() {
        if inh.skipped.is_empty() {
            println!(
                "weights inherited from the teacher: none (no tower of the teacher's family without weights of its own); the student starts as initialised"
            );
        } else {
            println!("weights inherited from the teacher: none; the student starts as initialised:");
            for line in inh.skipped.iter().take(4) {
                println!("  {line}");
            }
            if inh.skipped.len() > 4 {
                println!("  … and {} more", inh.skipped.len() - 4);
            }
        }
        return;
    }
    println!(
        "weights inherited from the teacher ({} tensors; `inherit = false` under [distill] turns this off):",
        inh.tensors
    );
    for line in &inh.towers {
        println!("  {line}");
    }
    for line in &inh.skipped {
        println!("  kept as initialised: {line}");
    }
}
