//! `stage4-train --teacher` as a user runs it: a trained run teaches a fresh student, the
//! teacher's embeddings are computed once and read back by the next run, and the gate checks
//! that the student came to agree with the teacher.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report}"))
}

fn p(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_trained_run_teaches_a_student_and_its_embeddings_are_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, cache) = (dir.path().join("teacher"), dir.path().join("cache"));
    let (_, log) = run(&["--epochs", "12", "--out", p(&teacher)]);
    assert!(teacher.join("model.safetensors").is_file(), "{log}");
    let student = |name: &str| {
        let (out, json) = (dir.path().join(name), dir.path().join(format!("{name}.json")));
        let (_, log) = run(&[
            "--teacher",
            p(&teacher),
            "--seed",
            "7",
            "--epochs",
            "8",
            "--feature-cache",
            p(&cache),
            "--out",
            p(&out),
            "--json",
            p(&json),
        ]);
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (log, r)
    };
    let (log, r) = student("a");
    assert!(
        log.contains("distillation loss: 1 × contrastive + 2000 × feature MSE"),
        "{log}"
    );
    assert!(log.contains("teacher and student, on the validation split:"), "{log}");
    assert!(
        !log.contains("(0 teacher forward passes"),
        "the first run must run the teacher:\n{log}"
    );
    assert_eq!(check(&r, "agreement with the teacher")["passed"], true, "{log}");
    let d = &r["metrics"]["distillation"];
    assert!(d["agreement"].as_f64().unwrap() > d["agreement_start"].as_f64().unwrap());
    assert!(d["teacher_params"].as_u64().unwrap() > 0);
    // The same teacher and data again: every embedding comes from the cache.
    let (log, _) = student("b");
    assert!(log.contains("(0 teacher forward passes, 40 rows reused"), "{log}");
}

#[test]
fn distillation_refuses_augmentation_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (code, log) = run(&[
        "--teacher",
        "clip-vit-b-32",
        "--augment",
        "--out",
        p(&dir.path().join("x")),
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("distillation with --augment"), "{log}");
}
