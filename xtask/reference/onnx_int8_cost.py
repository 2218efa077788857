"""What `clip-predict export --format onnx --quantize int8` costs and gains, measured in ONNX
Runtime on exports of the same model (fp32 and int8), each printed as one JSON line per export:

    python xtask/reference/onnx_int8_cost.py zero-shot --classes DIR EXPORT...
        accuracy on class folders (DIR/<label>/*.png), one prompt per class
        ("a photo of a {label}", --template to change it), as `clip-predict eval` does for a run
    python xtask/reference/onnx_int8_cost.py recall --pairs CAPTIONS.csv EXPORT...
        image→text and text→image recall@1 on a captions file (image,caption rows; an image may
        have several captions), as `clip-predict eval` does for a caption dataset
    python xtask/reference/onnx_int8_cost.py speed [--batch 16] [--seconds 10] EXPORT...
        images/s and captions/s (full captions of the context length: 77 tokens for CLIP) on
        fixed inputs, the exports timed in turn, each after two warm-up runs

Images are read as clip.json says (its resize rule with PIL: the shorter side, the longer rounded
down, then the centre crop, or a square resize; transparent pixels laid on white; then mean and
std), captions through tokenizer.json; sessions take clip.json's session_config
(unless --no-session-config). Threads: ONNX Runtime's default (one per
core) unless --threads. Needs: pip install onnxruntime numpy pillow tokenizers
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class Export:
    """Both encoders of one export folder, with its tokenizer and preprocessing."""

    def __init__(self, folder: Path, threads: int | None, session_config: bool = True):
        self.folder = folder
        self.cfg = json.loads((folder / "clip.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        for k, v in self.cfg.get("session_config", {}).items() if session_config else ():
            opts.add_session_config_entry(k, v)
        self.image = ort.InferenceSession(str(folder / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(folder / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_padding(pad_id=self.cfg["text"]["pad_id"])
        self.tok.enable_truncation(self.cfg["text"]["context_length"])

    def name(self) -> str:
        q = self.cfg.get("quantization")
        return "int8" if q else "fp32"

    def megabytes(self, graph: str) -> float:
        """The graph's size, its external weights (`.data`) included."""
        files = [self.folder / f"{graph}.onnx", self.folder / f"{graph}.onnx.data"]
        return sum(f.stat().st_size for f in files if f.exists()) / 1e6

    def pixels(self, path: Path) -> np.ndarray:
        i = self.cfg["image"]
        s, rule = i["image_size"], i["resize"]
        img = Image.open(path)
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        img = img.convert("RGB")
        f = FILTERS[i["interpolation"]]
        if "shortest_edge" in rule:
            e = rule["shortest_edge"]
            w, h = img.size
            w, h = (e, max(1, h * e // w)) if w <= h else (max(1, w * e // h), e)
            img = img.resize((w, h), f)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        else:
            img = img.resize((s, s), f)
        px = np.asarray(img, np.float32) / 255.0
        return ((px - i["mean"]) / i["std"]).transpose(2, 0, 1).astype(np.float32)

    def embed_images(self, paths: list[Path], batch: int = 64) -> np.ndarray:
        out = []
        for k in range(0, len(paths), batch):
            px = np.stack([self.pixels(p) for p in paths[k : k + batch]])
            out.append(self.image.run(None, {"pixel_values": px})[0])
        return np.concatenate(out)

    def ids(self, captions: list[str]) -> dict:
        enc = self.tok.encode_batch(captions)
        return {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        }

    def embed_texts(self, captions: list[str], batch: int = 256) -> np.ndarray:
        return np.concatenate(
            [self.text.run(None, self.ids(captions[k : k + batch]))[0] for k in range(0, len(captions), batch)]
        )


def zero_shot(e: Export, classes: Path, template: str, limit: int | None) -> dict:
    labels = sorted(d.name for d in classes.iterdir() if d.is_dir())
    paths, truth = [], []
    for c, label in enumerate(labels):
        files = sorted(f for f in (classes / label).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        files = files[:limit] if limit else files
        paths += files
        truth += [c] * len(files)
    text = e.embed_texts([template.replace("{label}", label) for label in labels])
    scores = e.embed_images(paths) @ text.T
    top5 = np.argsort(-scores, axis=1)[:, :5]
    truth = np.array(truth)
    acc1 = float(np.mean(top5[:, 0] == truth))
    acc5 = float(np.mean([t in row for t, row in zip(truth, top5)]))
    return {"task": "zero-shot", "images": len(paths), "classes": len(labels), "acc1": acc1, "acc5": acc5}


def recall(e: Export, pairs: Path) -> dict:
    rows = list(csv.DictReader(pairs.open(encoding="utf-8")))
    images = sorted({r["image"] for r in rows})
    of = [images.index(r["image"]) for r in rows]
    folder = pairs.parent / "images" if (pairs.parent / "images").is_dir() else pairs.parent
    img = e.embed_images([folder / i for i in images])
    txt = e.embed_texts([r["caption"] for r in rows])
    s = img @ txt.T  # images × captions
    i2t = float(np.mean([of[int(np.argmax(s[i]))] == i for i in range(len(images))]))
    t2i = float(np.mean([int(np.argmax(s[:, c])) == of[c] for c in range(len(rows))]))
    return {"task": "retrieval", "images": len(images), "captions": len(rows), "image_to_text_recall@1": i2t, "text_to_image_recall@1": t2i}


def per_second(run, n: int, seconds: float) -> float:
    run()
    run()
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        run()
        done += n
    return done / (time.perf_counter() - t)


def speed(e: Export, batch: int, seconds: float) -> dict:
    s = e.cfg["image"]["image_size"]
    px = np.sin(np.arange(batch * 3 * s * s, dtype=np.float32) * 0.013).reshape(batch, 3, s, s)
    length = e.cfg["text"]["context_length"]
    vocab = e.tok.get_vocab_size()
    ids = (np.arange(batch * length, dtype=np.int64).reshape(batch, length) * 7919) % vocab
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {
        "task": "speed",
        "batch": batch,
        "tokens": length,
        "images_per_s": per_second(lambda: e.image.run(None, {"pixel_values": px}), batch, seconds),
        "captions_per_s": per_second(lambda: e.text.run(None, feed), batch, seconds),
        "image_encoder_mb": e.megabytes("image_encoder"),
        "text_encoder_mb": e.megabytes("text_encoder"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["zero-shot", "recall", "speed"])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--classes", type=Path)
    p.add_argument("--template", default="a photo of a {label}")
    p.add_argument("--limit", type=int, help="at most this many images per class")
    p.add_argument("--pairs", type=Path)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-session-config", action="store_true", help="ignore clip.json's session_config")
    a = p.parse_args()
    for folder in a.exports:
        e = Export(folder, a.threads, not a.no_session_config)
        if a.task == "zero-shot":
            r = zero_shot(e, a.classes, a.template, a.limit)
        elif a.task == "recall":
            r = recall(e, a.pairs)
        else:
            r = speed(e, a.batch, a.seconds)
        config = e.cfg.get("session_config", {}) if not a.no_session_config else {}
        print(json.dumps({"export": str(folder), "weights": e.name(), **r, "session_config": config, "ort": ort.__version__}), flush=True)


if __name__ == "__main__":
    main()
