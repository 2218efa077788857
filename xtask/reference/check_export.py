"""Loads clipmine's exports in Python and compares them with clipmine's own answers.

For each run folder given (a fine-tune started from a pretrained CLIP, or a student trained from
scratch with a WordPiece tokenizer of its own), this script
  1. asks clipmine (`clip-predict image-to-text --run RUN --json`) for the cosine of every
     fixture image with every caption,
  2. exports the run with `clip-predict export --format open_clip` and `--format hf`
     (a ResNet CLIP to open_clip only, a Chinese-CLIP to hf only),
  3. loads each export with the real libraries — `open_clip.create_model_and_transforms("local-dir:…")`
     with `open_clip.get_tokenizer("local-dir:…")`, `CLIPModel` / `ChineseCLIPModel.from_pretrained`
     with the exported tokenizer and `*Processor.from_pretrained` —
  4. and prints the largest |Δ| of those cosines, and between the two Python loaders' embeddings.

The images are the fixture PNGs at the model's own size (32 or 64 px): no resize happens on either
side, so the figures measure the weights, names and tokenizers, not two resize implementations.

    python xtask/reference/check_export.py RUN [RUN …] [--bin target/debug/clip-predict]

Runs of every text-tower kind an export meets — a fine-tune of the tiny open_clip ViT, and
students trained from scratch with a CLIP text transformer (read at [SEP]: open_clip's
`pool_type "eos"` and `HFTokenizer`, `CLIPModel` with `PreTrainedTokenizerFast`), a BERT read at
[CLS] (`ChineseCLIPModel`) and a BERT read at the mean (refused by both formats, which this
script prints) — are made and kept by the clip-predict export tests:

    CLIPMINE_KEEP_RUNS=/tmp/runs cargo test -p clip-predict --test export
    python xtask/reference/check_export.py /tmp/runs/*

Needs: pip install torch open_clip_torch transformers safetensors pillow numpy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "crates/clip-core/tests/fixtures/clip/goldens"
IMAGES: list[Path] = []  # the fixture PNGs at the run's image size (set per run)
CAPTIONS = ["a photo of a cat", "一杯咖啡", "a rocket on the launch pad, at night!", "人蔘", "枸杞"]


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def rust_cosines(bin_: str, run_dir: Path) -> np.ndarray:
    out = json.loads(
        run([bin_, "image-to-text", "--run", str(run_dir), *map(str, IMAGES), "--texts", *CAPTIONS, "--json"])
    )
    m = np.zeros((len(IMAGES), len(CAPTIONS)))
    for i, r in enumerate(out["results"]):
        for c in r["captions"]:
            m[i, CAPTIONS.index(c["caption"])] = c["score"]
    return m


def pixels(mean, std) -> torch.Tensor:
    a = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in IMAGES])
    a = (a - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def cosines(img: torch.Tensor, txt: torch.Tensor) -> np.ndarray:
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    return (img @ txt.T).numpy()


def open_clip_side(d: Path):
    import open_clip

    model, _, _preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    tok = open_clip.get_tokenizer(f"local-dir:{d}")
    cfg = json.loads((d / "open_clip_config.json").read_text())["preprocess_cfg"]
    model.eval()
    with torch.no_grad():
        img = model.encode_image(pixels(cfg["mean"], cfg["std"]))
        txt = model.encode_text(tok(CAPTIONS))
    return img, txt


def hf_side(d: Path):
    import transformers

    cfg = json.loads((d / "config.json").read_text())
    chinese = cfg["model_type"] == "chinese_clip"
    cls = transformers.ChineseCLIPModel if chinese else transformers.CLIPModel
    proc_cls = transformers.ChineseCLIPProcessor if chinese else transformers.CLIPProcessor
    model = cls.from_pretrained(d).eval()
    proc = proc_cls.from_pretrained(d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    enc = proc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels(pre["image_mean"], pre["image_std"]))
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--bin", default=str(ROOT / "target/debug/clip-predict"))
    args = ap.parse_args()
    worst = 0.0
    for run_dir in args.runs:
        cfg = (run_dir / "config.toml").read_text()
        size = int(next(l.split("=")[1] for l in cfg.splitlines() if l.startswith("image_size")))
        IMAGES[:] = sorted(GOLDENS.glob(f"image{size}_*.png"))
        if not IMAGES:
            sys.exit(f"{run_dir}: no fixture images of {size} px in {GOLDENS}")
        rust = rust_cosines(args.bin, run_dir)
        resnet = 'arch = "clip_resnet"' in cfg
        chinese = 'kind = "bert"' in cfg
        formats = ["open_clip"] if resnet else ["hf"] if chinese else ["open_clip", "hf"]
        embs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for f in formats:
                d = Path(tmp) / f
                p = subprocess.run(
                    [args.bin, "export", "--run", str(run_dir), "--format", f, str(d)], capture_output=True, text=True
                )
                if p.returncode != 0:
                    # A format that cannot carry this model says why (e.g. two activations for open_clip).
                    print(f"{run_dir.name}: {f:9} export refused: {p.stderr.strip().splitlines()[-1]}")
                    continue
                img, txt = open_clip_side(d) if f == "open_clip" else hf_side(d)
                embs[f] = (img, txt)
                delta = float(np.abs(cosines(img, txt) - rust).max())
                worst = max(worst, delta)
                loader = "open_clip.create_model_and_transforms" if f == "open_clip" else "transformers from_pretrained"
                print(f"{run_dir.name}: {f:9} export, {loader}: max |Δ cosine| vs clipmine = {delta:.2e}")
        if len(embs) == 2:
            (a, b), (c, d) = embs["open_clip"], embs["hf"]
            e = max(float((a - c).abs().max()), float((b - d).abs().max()))
            print(f"{run_dir.name}: open_clip vs hf export, max |Δ embedding| = {e:.2e}")
    print(f"largest |Δ cosine| over all exports: {worst:.2e}")
    if worst > 1e-4:
        sys.exit("an export answers differently from clipmine")


if __name__ == "__main__":
    main()
