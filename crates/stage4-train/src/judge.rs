//! The end of a run: the gates (finite losses, the loss fell, the model learned), a fine-tune
//! against its checkpoint, a distillation's teacher beside its student, and the final report.

use anyhow::Result;
use clip_cli::html_report::{self, Fixed, Ranking, Thumbnails};
use clip_cli::plot;
use clip_cli::Report;
use clip_core::distill::{Footprint, Summary};
use clip_core::fit::{Trainer, Validation};
use clip_core::retrieval::Recall;

/// The gate: no NaN or Inf, the loss fell to half its first value, and the best model learned
/// (see clip_core::gates); then the after heat map and the full report.
pub fn judge(
    t: &mut Trainer,
    fixed: &mut Fixed,
    thumbs: &mut Thumbnails,
    report: &mut Report,
    alphas: Option<&[f64]>,
    footprints: Option<&[Footprint; 2]>,
) -> Result<()> {
    if t.state().best_epoch == 0 {
        println!("no epoch had a finite loss: model.safetensors holds the untrained model");
    }
    let fine_tune = t.cfg().pretrained.is_some();
    judge_losses(t, report, fine_tune);
    t.load_best()?;
    if let Some(alphas) = alphas {
        wise_ft(t, alphas)?;
    }
    if fine_tune {
        judge_fine_tune(t, report)?;
    }
    if t.teacher().is_some() {
        judge_distillation(t, report, footprints)?;
    }
    let after = t.fixed_similarity()?;
    fixed.heat_map(
        &t.out().join("similarity_after.png"),
        &after,
        "Similarity after training (best model)",
    )?;
    fixed.after = Some(after);
    fixed.save(t.out())?;
    let page = html_report::write(t, fixed, Some(&Ranking::compute(t)?), thumbs)?;
    report.metric("train_recall", t.recall(&t.data().split.train)?);
    report.metric("best_epoch", t.state().best_epoch);
    report.metric("best_val_loss", t.state().best_val_loss);
    report.metric("run", t.out().display().to_string());
    judge_learned(t, report, &page, fine_tune)
}

/// The last gate, what the best model learned (for a run not judged otherwise), and where the
/// run and its report are.
fn judge_learned(t: &Trainer, report: &mut Report, page: &std::path::Path, fine_tune: bool) -> Result<()> {
    if fine_tune || t.images_only() {
        // A fine-tune is judged against its start; images without captions by the agreement
        // with the teacher (nothing to retrieve).
        println!("\nrun folder: {} (model.safetensors, config.toml, tokenizer.json, metrics.json with the start and every epoch, loss.csv, plots)", t.out().display());
        println!("report: {}", page.display());
        report.metric("report", page.display().to_string());
        return Ok(());
    }
    // Zero-shot accuracy (class folders) or retrieval (captions), against what a model that
    // learned nothing scores: see clip_core::gates.
    let gate = clip_core::gates::learned(t)?;
    report.metric("gate", &gate);
    if gate.name == "zero-shot" {
        report.metric("train_zero_shot", gate.value);
    }
    let val = t.state().history.iter().filter_map(|h| h.zero_shot).next_back();
    let detail = match val {
        Some(v) => format!(
            "best model (epoch {}): {}; {v:.3} on validation (last epoch)",
            t.state().best_epoch,
            gate.detail
        ),
        None => format!("best model (epoch {}): {}", t.state().best_epoch, gate.detail),
    };
    report.check(gate.name, gate.passed, detail);
    println!("\nrun folder: {} (model.safetensors, config.toml, tokenizer.json, metrics.json, loss.csv, loss/lr/quality.png, similarity_before/after.png, similarity.json)", t.out().display());
    println!("report: {}", page.display());
    report.metric("report", page.display().to_string());
    Ok(())
}

/// WiSE-FT over `alphas`, one line per α; the best becomes the run's model.
fn wise_ft(t: &mut Trainer, alphas: &[f64]) -> Result<()> {
    println!(
        "\nWiSE-FT: (1−α)·checkpoint + α·fine-tuned (best epoch {}), on the validation split",
        t.state().best_epoch
    );
    let w = t.wise_ft(alphas, |p| {
        println!(
            "  α {:.2}: val {:.4}  {}",
            p.alpha,
            p.validation.loss,
            p.validation.describe()
        )
    })?;
    println!(
        "  kept α = {} as model.safetensors (wise_ft.png, report.html)",
        w.chosen
    );
    plot::wise_ft(&w).write_png(&t.out().join("wise_ft.png"))
}

/// A fine-tune's gate: the final model (the best epoch, or the WiSE-FT blend) validated against
/// the untouched checkpoint, side by side; it fails when the fine-tune made the model worse.
fn judge_fine_tune(t: &Trainer, report: &mut Report) -> Result<()> {
    let Some(start) = t.state().start else {
        report.check(
            "not below the start",
            false,
            "the run has no measurement of its checkpoint before training (started by an older clipmine): start it again to compare",
        );
        return Ok(());
    };
    let last = t.validate()?;
    let label = match &t.state().wise_ft {
        Some(w) => format!("final (epoch {}, WiSE-FT α {})", t.state().best_epoch, w.chosen),
        None => format!("final (best, epoch {})", t.state().best_epoch),
    };
    println!("\nbefore and after, on the validation split:");
    print!("{}", before_after_table(t, &start, &label, &last));
    report.metric("start", start);
    report.metric("final", last);
    let gate = clip_core::gates::not_below_start(&start, &last);
    report.check(gate.name, gate.passed, gate.detail.clone());
    report.metric("gate", &gate);
    Ok(())
}

/// A distillation's gate and the teacher beside the student: parameters, weights, embeddings
/// per second (measured at the start, one after the other), validation recall@1 and zero-shot
/// accuracy, and the student's top-1 agreement with the teacher.
fn judge_distillation(t: &mut Trainer, report: &mut Report, footprints: Option<&[Footprint; 2]>) -> Result<()> {
    let Some(summary) = distillation(t, footprints)? else {
        return Ok(());
    };
    print_distillation(&summary, t.data().device.is_cpu());
    report.metric("distillation", &summary);
    let gate = clip_core::gates::agreement_rose(summary.agreement_start.unwrap_or(0.0), summary.agreement);
    t.set_distillation(summary)?;
    report.check(gate.name, gate.passed, gate.detail);
    Ok(())
}

/// The teacher and the student on the validation split (`None` without a teacher).
fn distillation(t: &Trainer, footprints: Option<&[Footprint; 2]>) -> Result<Option<Summary>> {
    let Some(teacher) = t.teacher() else {
        return Ok(None);
    };
    let agreement = t.teacher_agreement()?.unwrap_or(0.0);
    let val = &t.data().split.val;
    let images_only = t.images_only();
    let (teacher_recall, student_recall) = if images_only {
        (None, None)
    } else {
        (t.teacher_recall(val)?, Some(t.recall(val)?))
    };
    Ok(Some(Summary {
        teacher: teacher.teacher.clone(),
        teacher_params: teacher.teacher_params,
        student_params: t.model().params.total_params(),
        teacher_footprint: footprints.map(|f| f[0]),
        student_footprint: footprints.map(|f| f[1]),
        teacher_recall,
        student_recall,
        teacher_zero_shot: t.teacher_zero_shot(val)?,
        student_zero_shot: t.zero_shot(val)?,
        agreement_start: t.state().agreement_start,
        agreement,
        images_only,
    }))
}

/// The table of the teacher beside the student, and how much smaller and faster the student is.
fn print_distillation(s: &Summary, cpu: bool) {
    println!(
        "\nteacher and student, on the validation {} (speed: random inputs of each model's shapes, batches of 16, measured one after the other at the start):",
        if s.images_only { "images" } else { "split" }
    );
    let zero_shot = s.student_zero_shot.is_some();
    let mut head = format!(
        "  {:<8} {:>11} {:>10} {:>10} {:>11}",
        "", "parameters", "weights", "images/s", "captions/s"
    );
    if !s.images_only {
        head.push_str(&format!(" {:>8} {:>8}", "R@1 i→t", "R@1 t→i"));
    }
    if zero_shot {
        head.push_str(&format!(" {:>10}", "zero-shot"));
    }
    head.push_str(&format!(" {:>10}", "agreement"));
    println!("{head}");
    let teacher = Row {
        params: s.teacher_params,
        footprint: s.teacher_footprint,
        recall: s.teacher_recall.as_ref(),
        zero_shot: s.teacher_zero_shot,
        agreement: None,
    };
    println!("{}", teacher.line("teacher", zero_shot));
    let student = Row {
        params: s.student_footprint.map_or(s.student_params, |f| f.parameters),
        footprint: s.student_footprint,
        recall: s.student_recall.as_ref(),
        zero_shot: s.student_zero_shot,
        agreement: Some(s.agreement),
    };
    println!("{}", student.line("student", zero_shot));
    if let (Some(f), Some(g)) = (s.teacher_footprint, s.student_footprint) {
        print_speeds(s, &f, &g, cpu);
    }
}

/// One model's row of the distillation table.
struct Row<'a> {
    params: usize,
    footprint: Option<Footprint>,
    recall: Option<&'a Recall>,
    zero_shot: Option<f64>,
    agreement: Option<f64>,
}

impl Row<'_> {
    /// The row, with a zero-shot column when `zero_shot_column`.
    fn line(&self, name: &str, zero_shot_column: bool) -> String {
        let mut line = format!("  {name:<8} {:>9.2} M", self.params as f64 / 1e6);
        match self.footprint {
            Some(f) => line.push_str(&format!(
                " {:>7.1} MB {:>10.1} {:>11.1}",
                f.weight_bytes as f64 / 1e6,
                f.images_per_second,
                f.captions_per_second
            )),
            None => line.push_str(&format!(" {:>10} {:>10} {:>11}", "–", "–", "–")),
        }
        if let Some(r) = self.recall {
            line.push_str(&format!(" {:>8.3} {:>8.3}", r.i2t_r1, r.t2i_r1));
        }
        if zero_shot_column {
            line.push_str(&format!(
                " {:>10}",
                self.zero_shot.map_or("–".into(), |z| format!("{z:.3}"))
            ));
        }
        line.push_str(&format!(
            " {:>10}",
            self.agreement.map_or("–".into(), |a| format!("{a:.3}"))
        ));
        line
    }
}

/// The student against the teacher `f`: parameters, image and caption speed, agreement.
fn print_speeds(s: &Summary, f: &Footprint, g: &Footprint, cpu: bool) {
    let start = s.agreement_start.unwrap_or(0.0);
    let fewer = f.parameters as f64 / g.parameters.max(1) as f64;
    println!(
        "  the student: {}, {:.1}× the teacher's image speed and {:.1}× its caption speed on this {}; agreement {start:.3} at the start{}",
        if fewer >= 1.0 {
            format!("{fewer:.1}× fewer parameters")
        } else {
            format!("{:.1}× more parameters", 1.0 / fewer)
        },
        g.images_per_second / f.images_per_second.max(1e-9),
        g.captions_per_second / f.captions_per_second.max(1e-9),
        if cpu { "CPU" } else { "device" },
        if s.images_only {
            " (images only: each image's nearest other image, the student's against the teacher's)"
        } else {
            ""
        }
    );
}

/// The start, every epoch and the final model in one table.
fn before_after_table(t: &Trainer, start: &Validation, label: &str, last: &Validation) -> String {
    let zs = start.zero_shot.is_some();
    let mut s = format!(
        "  {:<34} {:>9} {:>8} {:>8}{}\n",
        "",
        "val loss",
        "R@1 i→t",
        "R@1 t→i",
        if zs { "  zero-shot" } else { "" }
    );
    let mut row = |name: &str, v: &Validation| {
        s.push_str(&format!(
            "  {name:<34} {:>9.4} {:>8.3} {:>8.3}{}\n",
            v.loss,
            v.recall.i2t_r1,
            v.recall.t2i_r1,
            v.zero_shot.map(|a| format!("  {a:>9.3}")).unwrap_or_default()
        ));
    };
    row("start (checkpoint)", start);
    for r in &t.state().history {
        let v = Validation {
            loss: r.val_loss,
            recall: r.recall,
            zero_shot: r.zero_shot,
        };
        row(&format!("epoch {}", r.epoch), &v);
    }
    row(label, last);
    s
}

/// No NaN or Inf in any epoch's losses, and (training from scratch) the last epoch's training
/// loss at most half the first; a fine-tune starts low and is judged against its start instead.
fn judge_losses(t: &Trainer, report: &mut Report, fine_tune: bool) {
    let h = &t.state().history;
    let (first, last) = (
        h.first().map(|r| r.train_loss).unwrap_or(f64::NAN),
        h.last().map(|r| r.train_loss).unwrap_or(f64::NAN),
    );
    // Without a validation batch (a one-pair split) there is no validation loss to be finite.
    let validates = t.validates();
    report.check(
        "finite",
        h.iter()
            .all(|r| r.train_loss.is_finite() && (!validates || r.val_loss.is_finite())),
        if validates {
            "no NaN or Inf in any epoch's losses"
        } else {
            "no NaN or Inf in any epoch's training loss (no validation loss: the split is too small)"
        },
    );
    report.metric("first_epoch_loss", first);
    report.metric("last_epoch_loss", last);
    if fine_tune {
        return;
    }
    // The affinity term is a cross-entropy against the teacher's soft targets: it never falls
    // below the teacher's own entropy (about ln 13 with 13 copies of each caption in a batch),
    // so halving it can be impossible; falling at all is the check there.
    let floored = t.teacher().is_some() && t.cfg().distill.affinity > 0.0;
    let (threshold, rule) = if floored {
        (
            first,
            "below the first: the affinity term cannot fall below the teacher's own entropy",
        )
    } else {
        (0.5 * first, "half the first")
    };
    report.metric("loss_threshold", threshold);
    let fell = if floored { last < threshold } else { last <= threshold };
    report.check(
        "loss fell",
        fell,
        format!(
            "mean training loss {first:.4} (epoch 1) → {last:.4} (epoch {}), needs {} {threshold:.4} ({rule}){}",
            h.len(),
            if floored { "<" } else { "≤" },
            if fell {
                ""
            } else {
                " — try more epochs, higher learning rates (--lr-head, --lr-image, --lr-text), or check stage 3"
            }
        ),
    );
}
