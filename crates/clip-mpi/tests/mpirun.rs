//! Data-parallel training over MPI (issue #35), under a real `mpirun -np 2` on this machine.
//!
//! MPI starts once per process, so this test has no libtest harness: run by cargo, it starts
//! itself under `mpirun` twice and judges what the ranks did.
//! - `equal`: batches of 16 as 2 ranks × 8 (micro-batches of 4) give, over 3 steps, the losses
//!   and weights (≤ 1e-5 relative) of one process with batches of 16; the two ranks hold the
//!   same weights, bit for bit.
//! - `panic`: rank 1 panics at the second step; the job ends at once with an error naming the
//!   rank (rather than rank 0 waiting in its next collective for ever).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clip_core::data::Batch;
use clip_core::optim::AdamW;
use clip_core::train::{train_step_data_parallel, train_step_objective, Contrastive};
use clip_core::{ClipConfig, ClipModel};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if clip_mpi::launch().is_some() {
        rank_main(&mode);
        return;
    }
    if std::process::Command::new("mpirun").arg("--version").output().is_err() {
        println!("mpirun not found: install openmpi-bin (apt-get install openmpi-bin libopenmpi-dev)");
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
    let mut failed = 0;
    let (code, out, err) = mpirun("equal", Duration::from_secs(600));
    let equal = code == Some(0) && out.contains("rank 0: 3 steps as one process") && out.contains("rank 1: 3 steps");
    report("2 ranks × 8 train as one process × 16", equal, &out, &err);
    failed += usize::from(!equal);
    let started = Instant::now();
    let (code, out, err) = mpirun("panic", Duration::from_secs(300));
    let ended = code.is_some_and(|c| c != 0) && err.contains("rank 1 of 2 panicked");
    report(
        &format!(
            "a panicking rank ends the job ({:.0} s)",
            started.elapsed().as_secs_f64()
        ),
        ended,
        &out,
        &err,
    );
    failed += usize::from(!ended);
    println!("{} passed, {failed} failed", 2 - failed);
    std::process::exit(i32::from(failed > 0));
}

fn report(what: &str, ok: bool, out: &str, err: &str) {
    println!("test {what} ... {}", if ok { "ok" } else { "FAILED" });
    if !ok {
        println!("--- stdout\n{out}\n--- stderr\n{err}");
    }
}

/// Runs this test's binary as 2 ranks; (exit code, stdout, stderr). Killed after `limit`.
fn mpirun(mode: &str, limit: Duration) -> (Option<i32>, String, String) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("mpirun")
        .args(["--oversubscribe", "-np", "2"])
        .arg(&exe)
        .arg(mode)
        // As root (CI runs so), Open MPI refuses to start without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Two ranks on two cores: one compute thread each.
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |r: Option<&mut dyn std::io::Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let out = read(child.stdout.as_mut().map(|r| r as &mut dyn std::io::Read));
    let err = read(child.stderr.as_mut().map(|r| r as &mut dyn std::io::Read));
    (status, out, err)
}

/// What each rank runs.
fn rank_main(mode: &str) {
    let comm = clip_mpi::connect().expect("MPI starts");
    let (rank, size) = (comm.rank(), comm.size());
    assert_eq!(size, 2, "mpirun -np 2");
    let cfg = vit_clip();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&model.params, &cfg.train).unwrap();
    let mut losses = vec![];
    for step in 0..3 {
        if mode == "panic" && rank == 1 && step == 1 {
            panic!("a rank fails mid-run");
        }
        let global = batch(&cfg, 16, step);
        let mine = global.split(8).unwrap().swap_remove(rank);
        let out = train_step_data_parallel(
            &model,
            &mut opt,
            &mine,
            (&global).into(),
            0.0,
            4,
            &Contrastive,
            comm.as_ref(),
        )
        .unwrap();
        losses.push(out.loss);
    }
    // The ranks hold the same weights, bit for bit.
    let mine = flat(&model);
    let all = comm.all_gather(&mine).unwrap();
    assert_eq!(&all[..mine.len()], &all[mine.len()..], "the ranks' weights differ");
    if rank == 0 {
        // One process with the whole batches.
        let one = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(&one.params, &cfg.train).unwrap();
        for (step, loss) in losses.iter().enumerate() {
            let b = batch(&cfg, 16, step as u32);
            let want = train_step_objective(&one, &mut opt, std::slice::from_ref(&b), 0.0, 4, &Contrastive)
                .unwrap()
                .loss;
            assert!(
                (want - loss).abs() <= 1e-5 * want.abs(),
                "step {step}: loss {loss}, one process {want}"
            );
        }
        for (name, e) in model.params.entries() {
            if name.ends_with("k_proj.bias") {
                // Its gradient is 0 in exact arithmetic: rounding noise, which AdamW scales up.
                continue;
            }
            let (a, b) = (e.var.as_tensor(), one.params.get(&name).unwrap().var);
            let d = (a - b.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let n = a.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(
                d.sqrt() <= 1e-5 * n.sqrt().max(1e-30),
                "{name}: {:.2e} relative",
                (d / n).sqrt()
            );
        }
        println!("rank 0: 3 steps as one process with batches of 16 (losses {losses:?})");
    } else {
        println!("rank {rank}: 3 steps, weights as rank 0's");
    }
}

fn flat(model: &ClipModel) -> Vec<f32> {
    model
        .params
        .entries()
        .into_iter()
        .flat_map(|(_, e)| e.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// A small ViT CLIP from scratch, without dropout.
fn vit_clip() -> ClipConfig {
    let mut cfg = ClipConfig::preset("student-vit-s").unwrap();
    cfg.projection_dim = 16;
    cfg.image.image_size = 32;
    cfg.image.patch_size = 8;
    cfg.image.width = 32;
    cfg.image.layers = 2;
    cfg.image.heads = 2;
    cfg.image.mlp_dim = 64;
    cfg.text.vocab_size = 300;
    cfg.text.dim = 32;
    cfg.text.n_layers = 2;
    cfg.text.n_heads = 2;
    cfg.text.hidden_dim = 64;
    cfg.text.max_position_embeddings = 16;
    cfg.data.max_length = 16;
    cfg.text.dropout = 0.0;
    cfg.text.attention_dropout = 0.0;
    cfg.head_dropout = 0.0;
    cfg
}

/// `n` pairs of pseudo-random pixels and tokens (some padded).
fn batch(cfg: &ClipConfig, n: usize, seed: u32) -> Batch {
    let s = cfg.image.image_size;
    let pixels: Vec<f32> = (0..n * 3 * s * s)
        .map(|i| (((i as u32 ^ seed.wrapping_mul(0x9e37_79b9)) as f32 * 0.618_034).fract() - 0.5) * 3.0)
        .collect();
    let l = 12;
    let vocab = cfg.text.vocab_size as u32;
    let ids: Vec<u32> = (0..(n * l) as u32)
        .map(|i| 3 + (i.wrapping_mul(7919) ^ seed.wrapping_mul(104_729)) % (vocab - 4))
        .collect();
    let mask: Vec<u32> = (0..n * l).map(|i| u32::from(i % l < l - (i / l) % 4)).collect();
    let dev = &Device::Cpu;
    Batch {
        images: Tensor::from_vec(pixels, (n, 3, s, s), dev).unwrap(),
        input_ids: Tensor::from_vec(ids, (n, l), dev).unwrap(),
        attention_mask: Tensor::from_vec(mask, (n, l), dev).unwrap(),
        pairs: (0..n).collect(),
        positives: Tensor::eye(n, DType::F32, dev).unwrap(),
        image_features: None,
        text_features: None,
        global: None,
    }
}
