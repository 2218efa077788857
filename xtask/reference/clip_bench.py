#!/usr/bin/env python3
"""open_clip's side of `cargo xtask bench infer|train --preset clip-vit-b-32|clip-rn50`: image and
caption embeddings per second in evaluation mode, or a fine-tuning step (open_clip's ClipLoss,
AdamW at 1e-5 with weight decay 0.1, as open_clip_train runs it), with random weights (the speed
does not depend on them, and no machine here reaches the real ones).

    pip install torch open_clip_torch
    python3 xtask/reference/clip_bench.py bench-infer --model ViT-B-32 --batch-size 16 --steps 10
    python3 xtask/reference/clip_bench.py bench-train --model ViT-B-32 --batch-size 16 --steps 5

`--model` is an open_clip architecture (ViT-B-32, RN50), built with `quick_gelu=True` as OpenAI's
weights are. Captions are 77 random ids ending in the end-of-text token: open_clip always runs
the whole 77-token context. Prints one JSON line with the keys of simple_clip.py's bench-infer.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import open_clip
import torch


def amp(a):
    """autocast's context for --precision autocast, else none."""
    import contextlib
    if a.precision == "autocast":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["bench-infer", "bench-train"])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "autocast", "matmul-bf16"],
                   help="fp32; autocast (torch.autocast('cpu', bfloat16) around forward and loss); "
                        "matmul-bf16 (fp32 tensors, fp32 GEMMs run as bf16 on oneDNN/AMX)")
    a = p.parse_args()
    if a.precision == "matmul-bf16":
        torch.set_float32_matmul_precision("medium")
        try:  # torch ≥ 2.9: oneDNN's own switch for fp32 GEMMs and convolutions on the CPU
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
            torch.backends.mkldnn.conv.fp32_precision = "bf16"
        except AttributeError:
            pass
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = open_clip.create_model(a.model, pretrained=None, quick_gelu=True).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 49406, (a.batch_size, 77))
        ids[:, 0], ids[:, -1] = 49406, 49407
        batches.append((torch.randn(a.batch_size, 3, size, size), ids))
    if a.cmd == "bench-train":
        return train(a, model, batches, size)
    t_image = t_text = 0.0
    with torch.inference_mode(), amp(a)():
        for step in range(a.warmup + a.steps):
            images, ids = batches[step % 2]
            t0 = time.perf_counter()
            model.encode_image(images)
            t1 = time.perf_counter()
            model.encode_text(ids)
            t2 = time.perf_counter()
            if step >= a.warmup:
                t_image += t1 - t0
                t_text += t2 - t1
    n = max(a.steps, 1)
    print(json.dumps({
        "impl": "pytorch", "bench": "infer", "torch": torch.__version__, "open_clip": open_clip.__version__,
        "config": a.model, "precision": a.precision, "batch_size": a.batch_size, "image_size": size, "seq_len": 77, "steps": a.steps,
        "warmup": a.warmup, "images_per_s": round(a.batch_size * n / t_image, 3),
        "captions_per_s": round(a.batch_size * n / t_text, 3),
        "ms_per_image_batch": round(1000 * t_image / n, 2), "ms_per_text_batch": round(1000 * t_text / n, 2),
        "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
    }))


def train(a, model, batches, size) -> None:
    """One fine-tuning step as open_clip_train takes it: both towers, ClipLoss, AdamW with weight
    decay on the weight matrices only, logit_scale clamped after the step."""
    from open_clip.loss import ClipLoss

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-5)
    loss_fn = ClipLoss()
    times = []
    for step in range(a.warmup + a.steps):
        images, ids = batches[step % 2]
        t0 = time.perf_counter()
        with amp(a)():
            img, txt, scale = model(images, ids)
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times) / max(len(times), 1)
    print(json.dumps({
        "impl": "pytorch", "bench": "train", "torch": torch.__version__, "open_clip": open_clip.__version__,
        "config": a.model, "precision": a.precision, "batch_size": a.batch_size, "image_size": size, "seq_len": 77, "steps": a.steps,
        "warmup": a.warmup, "ms_per_step": round(ms, 2), "pairs_per_s": round(1000 * a.batch_size / ms, 3),
        "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
    }))


if __name__ == "__main__":
    main()
