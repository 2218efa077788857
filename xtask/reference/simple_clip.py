#!/usr/bin/env python3
"""PyTorch reference for clipmine: the "Simple CLIP" tutorial recipe (M. Shariatnia,
"OpenAI CLIP simple implementation"), kept compact and faithful so the Rust/candle port can be
checked against it: parameter counts, tensor names, loss values and training speed.

Model (names match the tutorial's modules, and so the Rust `ParamStore` names):
  image_encoder.model.*   timm ResNet, num_classes=0, global_pool="avg"   (group: image tower)
  text_encoder.model.*    transformers DistilBertModel from a config, CLS output (group: text tower)
  image_projection.*      ProjectionHead(image_embedding -> P)            (group: heads)
  text_projection.*       ProjectionHead(text_embedding -> P)             (group: heads)
  logit_scale             only for --loss clip (scalar, init ln(1/0.07))  (group: heads)

Nothing is downloaded: every tower starts from random weights (pretrained=False).

Subcommands: params, names, bench, bench-infer, train-folders (see README.md beside this file).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # 2.6592600369327779
CLIP_MAX_LOGIT_SCALE = math.log(100.0)  # 4.605170185988092
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Config: the same presets as crates/clip-core/src/config.rs
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageCfg:
    # A timm model name (e.g. "resnet50", "resnet18"), or "custom" to build a timm ResNet from
    # block/depths/stem_width/widths (how the Rust `tiny` preset is described).
    model: str = "custom"
    image_size: int = 64
    block: str = "basic"  # basic | bottleneck (custom only)
    depths: tuple = (1, 1, 1, 1)
    stem_width: int = 16
    widths: tuple = (16, 32, 64, 128)
    stem_pool: bool = True
    stem_stride: int = 2
    stem_kernel: int = 7


@dataclass
class TextCfg:
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 256
    max_position_embeddings: int = 64
    dropout: float = 0.1
    attention_dropout: float = 0.1


@dataclass
class TrainCfg:
    batch_size: int = 8
    epochs: int = 30
    lr_image: float = 1e-4
    lr_text: float = 1e-5
    lr_head: float = 1e-3
    weight_decay: float = 1e-3
    patience: int = 1
    factor: float = 0.8


@dataclass
class Cfg:
    name: str = "tiny"
    image: ImageCfg = field(default_factory=ImageCfg)
    text: TextCfg = field(default_factory=TextCfg)
    projection_dim: int = 128
    head_dropout: float = 0.1
    loss: str = "clip"  # soft | clip
    temperature: float = 1.0
    seed: int = 42
    max_length: int = 64
    train: TrainCfg = field(default_factory=TrainCfg)


def preset(name: str) -> Cfg:
    if name == "tiny":
        return Cfg(train=TrainCfg(lr_image=1e-3, lr_text=1e-3, lr_head=1e-3))
    if name == "simple-clip":
        # The tutorial's CFG: resnet50 (2048-d), distilbert-base-uncased (768-d), P=256, T=1.0.
        return Cfg(
            name="simple-clip",
            image=ImageCfg(model="resnet50", image_size=224, block="bottleneck", depths=(3, 4, 6, 3),
                           stem_width=64, widths=(64, 128, 256, 512)),
            text=TextCfg(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                         max_position_embeddings=512),
            projection_dim=256, loss="soft", temperature=1.0, max_length=200,
            train=TrainCfg(batch_size=32, epochs=4),
        )
    raise SystemExit(f"unknown preset {name!r}; the presets are: tiny, simple-clip")


# ----------------------------------------------------------------------------------------------
# Model: the tutorial's modules
# ----------------------------------------------------------------------------------------------
def build_resnet(c: ImageCfg) -> nn.Module:
    import timm
    if c.model != "custom":
        return timm.create_model(c.model, pretrained=False, num_classes=0, global_pool="avg")
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[c.block]
    m = ResNet(block=block, layers=tuple(c.depths), num_classes=0, global_pool="avg", channels=tuple(c.widths))
    if (c.stem_width, c.stem_kernel, c.stem_stride) != (64, 7, 2):
        # timm's plain stem is always 64 wide, 7x7, stride 2: rebuild the stem (same names: conv1, bn1)
        # and the stages that follow it, then re-run timm's own initialisation.
        from timm.models.resnet import make_blocks
        m.conv1 = nn.Conv2d(3, c.stem_width, c.stem_kernel, c.stem_stride, c.stem_kernel // 2, bias=False)
        m.bn1 = nn.BatchNorm2d(c.stem_width)
        stages, _ = make_blocks((block,) * len(c.widths), tuple(c.widths), tuple(c.depths), c.stem_width)
        for name, stage in stages:
            setattr(m, name, stage)
        m.init_weights(zero_init_last=True)
    if not c.stem_pool:
        m.maxpool = nn.Identity()
    return m


class ImageEncoder(nn.Module):
    """Encode images to a fixed size vector (timm ResNet, pooled, no classifier)."""

    def __init__(self, c: ImageCfg, trainable: bool = True):
        super().__init__()
        self.model = build_resnet(c)
        for p in self.model.parameters():
            p.requires_grad = trainable

    def forward(self, x):
        return self.model(x)


class TextEncoder(nn.Module):
    """DistilBERT from a config (no download); the sentence embedding is the CLS token's state."""

    def __init__(self, c: TextCfg, trainable: bool = True):
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel
        cfg = DistilBertConfig(vocab_size=c.vocab_size, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                               hidden_dim=c.hidden_dim, max_position_embeddings=c.max_position_embeddings,
                               dropout=c.dropout, attention_dropout=c.attention_dropout)
        self.model = DistilBertModel(cfg)
        for p in self.model.parameters():
            p.requires_grad = trainable
        self.target_token_idx = 0  # CLS

    def forward(self, input_ids, attention_mask):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return output.last_hidden_state[:, self.target_token_idx, :]


class ProjectionHead(nn.Module):
    def __init__(self, embedding_dim: int, projection_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(embedding_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x):
        projected = self.projection(x)
        x = self.gelu(projected)
        x = self.fc(x)
        x = self.dropout(x)
        x = x + projected
        x = self.layer_norm(x)
        return x


def cross_entropy(preds, targets, reduction="none"):
    """The tutorial's soft-target cross entropy (per row)."""
    loss = (-targets * F.log_softmax(preds, dim=-1)).sum(1)
    if reduction == "none":
        return loss
    return loss.mean()


def soft_loss(image_embeddings, text_embeddings, temperature: float = 1.0):
    """The tutorial's loss: targets from the mean of image-image and text-text similarity."""
    logits = (text_embeddings @ image_embeddings.T) / temperature
    images_similarity = image_embeddings @ image_embeddings.T
    texts_similarity = text_embeddings @ text_embeddings.T
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    texts_loss = cross_entropy(logits, targets, reduction="none")
    images_loss = cross_entropy(logits.T, targets.T, reduction="none")
    loss = (images_loss + texts_loss) / 2.0  # shape: (batch_size)
    return loss.mean()


def clip_loss(image_embeddings, text_embeddings, logit_scale):
    """The CLIP paper's loss: cosine similarity x exp(s), s clamped at ln(100), diagonal targets."""
    image = F.normalize(image_embeddings, dim=-1)
    text = F.normalize(text_embeddings, dim=-1)
    scale = logit_scale.clamp(max=CLIP_MAX_LOGIT_SCALE).exp()
    logits = scale * text @ image.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2.0


class CLIPModel(nn.Module):
    def __init__(self, cfg: Cfg):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image)
        self.text_encoder = TextEncoder(cfg.text)
        self.image_projection = ProjectionHead(self.image_encoder.model.num_features,
                                               cfg.projection_dim, cfg.head_dropout)
        self.text_projection = ProjectionHead(cfg.text.dim, cfg.projection_dim, cfg.head_dropout)
        self.temperature = cfg.temperature
        if cfg.loss == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT_SCALE))
        elif cfg.loss == "soft":
            self.logit_scale = None
        else:
            raise SystemExit(f"unknown loss {cfg.loss!r}: soft | clip")

    def embed(self, batch):
        image_features = self.image_encoder(batch["image"])
        text_features = self.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.image_projection(image_features), self.text_projection(text_features)

    def forward(self, batch):
        image_embeddings, text_embeddings = self.embed(batch)
        if self.logit_scale is None:
            return soft_loss(image_embeddings, text_embeddings, self.temperature)
        return clip_loss(image_embeddings, text_embeddings, self.logit_scale)


def heads_params(model: CLIPModel):
    ps = itertools.chain(model.image_projection.parameters(), model.text_projection.parameters())
    if model.logit_scale is not None:
        ps = itertools.chain(ps, [model.logit_scale])
    return ps


def make_optimizer(model: CLIPModel, t: TrainCfg):
    """Exactly the tutorial's groups: weight decay only on the heads (AdamW default decay set to 0)."""
    params = [
        {"params": model.image_encoder.parameters(), "lr": t.lr_image},
        {"params": model.text_encoder.parameters(), "lr": t.lr_text},
        {"params": heads_params(model), "lr": t.lr_head, "weight_decay": t.weight_decay},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=t.patience,
                                                           factor=t.factor)
    return optimizer, scheduler


def count(module_or_params) -> int:
    ps = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    return sum(p.numel() for p in ps)


def param_counts(model: CLIPModel) -> dict:
    d = {
        "image_tower": count(model.image_encoder),
        "text_tower": count(model.text_encoder),
        "image_head": count(model.image_projection),
        "text_head": count(model.text_projection),
        "logit_scale": 0 if model.logit_scale is None else 1,
    }
    d["heads"] = d["image_head"] + d["text_head"] + d["logit_scale"]
    d["total"] = count(model)
    assert d["total"] == d["image_tower"] + d["text_tower"] + d["heads"]
    d["buffers"] = sum(b.numel() for b in model.buffers())
    return d


# ----------------------------------------------------------------------------------------------
# CLI helpers
# ----------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--preset", default="tiny", choices=["tiny", "simple-clip"])
    g.add_argument("--image-model", help='timm name (resnet18, resnet50, ...) or "custom"')
    g.add_argument("--image-size", type=int)
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--text-dim", type=int)
    g.add_argument("--text-layers", type=int)
    g.add_argument("--text-heads", type=int)
    g.add_argument("--text-hidden", type=int)
    g.add_argument("--max-positions", type=int)
    g.add_argument("--projection-dim", type=int)
    g.add_argument("--loss", choices=["soft", "clip"])
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)


def add_bench_args(p: argparse.ArgumentParser):
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32, help="caption tokens (all unpadded)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "autocast", "matmul-bf16"],
                   help="fp32; autocast (torch.autocast('cpu', bfloat16) around the forward pass and the loss); "
                        "matmul-bf16 (fp32 tensors, fp32 GEMMs run as bf16 on oneDNN/AMX)")


def precision_context(a):
    """The bf16 mode a PyTorch user would type: autocast, or bf16 precision for fp32 matmuls."""
    import contextlib
    if a.precision == "matmul-bf16":
        set_matmul_bf16()
    if a.precision == "autocast":
        return lambda: torch.autocast(a.device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def set_matmul_bf16():
    torch.set_float32_matmul_precision("medium")
    try:  # torch ≥ 2.9: oneDNN's own switch for fp32 GEMMs and convolutions on the CPU
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    except AttributeError:
        pass


def cfg_from_args(a) -> Cfg:
    c = preset(a.preset)
    im = {"model": a.image_model, "image_size": a.image_size}
    tx = {"vocab_size": a.vocab_size, "dim": a.text_dim, "n_layers": a.text_layers, "n_heads": a.text_heads,
          "hidden_dim": a.text_hidden, "max_position_embeddings": a.max_positions}
    top = {"projection_dim": a.projection_dim, "loss": a.loss, "temperature": a.temperature, "seed": a.seed}
    c.image = replace(c.image, **{k: v for k, v in im.items() if v is not None})
    c.text = replace(c.text, **{k: v for k, v in tx.items() if v is not None})
    c = replace(c, **{k: v for k, v in top.items() if v is not None})
    c.max_length = min(c.max_length, c.text.max_position_embeddings)
    return c


def build(cfg: Cfg) -> CLIPModel:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return CLIPModel(cfg)


def cmd_params(a):
    cfg = cfg_from_args(a)
    model = build(cfg)
    out = {"preset": cfg.name, "image_model": cfg.image.model,
           "image_embedding": model.image_encoder.model.num_features, "text_embedding": cfg.text.dim,
           "projection_dim": cfg.projection_dim, "loss": cfg.loss, **param_counts(model)}
    print(json.dumps(out))


def cmd_names(a):
    """Every parameter and buffer with its shape (and whether it is a buffer), in module order."""
    model = build(cfg_from_args(a))
    bufs = {n for n, _ in model.named_buffers()}
    rows = [(n, list(t.shape), str(t.dtype).replace("torch.", ""), "buffer" if n in bufs else "param")
            for n, t in model.state_dict(keep_vars=True).items()]
    if a.filter:
        rows = [r for r in rows if a.filter in r[0]]
    if a.limit:
        rows = rows[: a.limit]
    for n, shape, dtype, kind in rows:
        print(f"{kind:6s} {n} {shape} {dtype}")
    if a.save:
        from safetensors.torch import save_file
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
              if not (a.drop_num_batches_tracked and k.endswith(".num_batches_tracked"))}
        save_file(sd, a.save)
        print(f"saved {len(sd)} tensors to {a.save}", file=sys.stderr)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(cfg: Cfg, b: int, seq_len: int, device, gen: torch.Generator):
    s = cfg.image.image_size
    ids = torch.randint(4, cfg.text.vocab_size, (b, seq_len), generator=gen)
    ids[:, 0] = 2 if cfg.text.vocab_size < 102 else 101  # a CLS-like first token
    mask = torch.ones(b, seq_len, dtype=torch.long)
    return {"image": torch.randn(b, 3, s, s, generator=gen).to(device),
            "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0), 1)


def bench_setup(a):
    """What `bench` and `bench-infer` share: threads, the model on its device, two random batches."""
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = cfg_from_args(a)
    device = torch.device(a.device)
    model = build(cfg).to(device)
    seq_len = min(a.seq_len, cfg.text.max_position_embeddings)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [random_batch(cfg, a.batch_size, seq_len, device, gen) for _ in range(2)]
    return cfg, device, model, seq_len, batches


def cmd_bench(a):
    cfg, device, model, seq_len, batches = bench_setup(a)
    model.train()
    optimizer, _ = make_optimizer(model, cfg.train)
    amp = precision_context(a)
    t_fwd = t_bwd = t_opt = 0.0
    losses = []
    for step in range(a.warmup + a.steps):
        batch = batches[step % 2]
        sync(device)
        t0 = time.perf_counter()
        with amp():
            loss = model(batch)
        sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        sync(device)
        t3 = time.perf_counter()
        if step >= a.warmup:
            t_fwd += t1 - t0
            t_bwd += t2 - t1
            t_opt += t3 - t2
            losses.append(round(loss.item(), 5))
    total = t_fwd + t_bwd + t_opt
    out = {
        "impl": "pytorch", "torch": torch.__version__, "preset": cfg.name, "image_model": cfg.image.model,
        "device": a.device, "threads": torch.get_num_threads(), "loss": cfg.loss,
        "batch_size": a.batch_size, "image_size": cfg.image.image_size, "seq_len": seq_len,
        "steps": a.steps, "warmup": a.warmup, "params": count(model), "precision": a.precision,
        "pairs_per_s": round(a.batch_size * a.steps / total, 3),
        "ms_per_step": round(1000 * total / a.steps, 2),
        "forward_share": round(t_fwd / total, 3), "backward_share": round(t_bwd / total, 3),
        "optimizer_share": round(t_opt / total, 3), "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(out))


def cmd_bench_infer(a):
    """Each tower with its projection head in eval mode (clipmine's encode_image / encode_text),
    timed apart: building an index runs the image side, a query the text side."""
    cfg, device, model, seq_len, batches = bench_setup(a)
    model.eval()
    amp = precision_context(a)
    t_image = t_text = 0.0
    with torch.inference_mode(), amp():
        for step in range(a.warmup + a.steps):
            batch = batches[step % 2]
            sync(device)
            t0 = time.perf_counter()
            model.image_projection(model.image_encoder(batch["image"])).cpu()
            sync(device)
            t1 = time.perf_counter()
            model.text_projection(model.text_encoder(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"])).cpu()
            sync(device)
            t2 = time.perf_counter()
            if step >= a.warmup:
                t_image += t1 - t0
                t_text += t2 - t1
    n = max(a.steps, 1)
    out = {
        "impl": "pytorch", "bench": "infer", "torch": torch.__version__, "config": cfg.name,
        "image_model": cfg.image.model, "device": a.device, "batch_size": a.batch_size, "precision": a.precision,
        "image_size": cfg.image.image_size, "seq_len": seq_len, "steps": a.steps, "warmup": a.warmup,
        "images_per_s": round(a.batch_size * n / t_image, 3), "captions_per_s": round(a.batch_size * n / t_text, 3),
        "ms_per_image_batch": round(1000 * t_image / n, 2), "ms_per_text_batch": round(1000 * t_text / n, 2),
        "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# train-folders: class folders -> captions "a photo of a {label}" -> zero-shot accuracy
# ----------------------------------------------------------------------------------------------
class WordTokenizer:
    """Lower-case word vocabulary with BERT-style specials; enough for template captions."""

    PAD, UNK, CLS, SEP = 0, 1, 2, 3

    def __init__(self, texts, vocab_size: int):
        words = sorted({w for t in texts for w in self.split(t)})
        self.vocab = {w: i + 4 for i, w in enumerate(words)}
        if len(self.vocab) + 4 > vocab_size:
            raise SystemExit(f"{len(self.vocab) + 4} words exceed the text vocab of {vocab_size}")

    @staticmethod
    def split(t):
        return t.lower().replace(",", " ").replace(".", " ").split()

    def __call__(self, texts, max_length: int):
        ids = [[self.CLS] + [self.vocab.get(w, self.UNK) for w in self.split(t)][: max_length - 2] + [self.SEP]
               for t in texts]
        n = max(len(x) for x in ids)  # padding=True: pad to the longest in the batch
        input_ids = torch.tensor([x + [self.PAD] * (n - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        return input_ids, mask


def load_folders(root: Path, size: int):
    from PIL import Image
    import numpy as np
    labels = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not labels:
        raise SystemExit(f"{root}: no class folders")
    xs, ys = [], []
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    for li, label in enumerate(labels):
        for f in sorted((root / label).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            im = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)  # the tutorial's Resize
            arr = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std  # A.Normalize(max_pixel_value=255)
            xs.append(torch.from_numpy(arr).permute(2, 0, 1))
            ys.append(li)
    return labels, torch.stack(xs), torch.tensor(ys)


def caption(label: str) -> str:
    return f"a photo of a {label.replace('_', ' ')}"


@torch.no_grad()
def zero_shot(model, tok, labels, xs, ys, device, max_length, bs=256):
    model.eval()
    ids, mask = tok([caption(l) for l in labels], max_length)
    t = model.text_projection(model.text_encoder(ids.to(device), mask.to(device)))
    t = F.normalize(t, dim=-1)
    correct = 0
    for i in range(0, len(xs), bs):
        im = F.normalize(model.image_projection(model.image_encoder(xs[i:i + bs].to(device))), dim=-1)
        correct += ((im @ t.T).argmax(-1).cpu() == ys[i:i + bs]).sum().item()
    return correct / max(1, len(xs))


def run_epoch(model, optimizer, tok, labels, xs, ys, idx, bs, device, max_length, train: bool):
    model.train(train)
    total, n = 0.0, 0
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        if train and len(j) < 2:  # BatchNorm needs more than one sample
            continue
        ids, mask = tok([caption(labels[k]) for k in ys[j].tolist()], max_length)
        batch = {"image": xs[j].to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}
        with torch.set_grad_enabled(train):
            loss = model(batch)
        if train:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        total += loss.item() * len(j)
        n += len(j)
    return total / max(1, n)


def cmd_train_folders(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = cfg_from_args(a)
    if a.image_size is None:
        cfg.image.image_size = 32
    device = torch.device(a.device)
    labels, xs, ys = load_folders(Path(a.root), cfg.image.image_size)
    tok = WordTokenizer([caption(l) for l in labels], cfg.text.vocab_size)
    model = build(cfg).to(device)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(xs), generator=g)
    n_val = int(len(xs) * a.val_fraction)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    bs = a.batch_size or cfg.train.batch_size
    epochs = a.epochs or cfg.train.epochs
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        train_loss = run_epoch(model, optimizer, tok, labels, xs, ys, order, bs, device, cfg.max_length, True)
        valid_loss = run_epoch(model, optimizer, tok, labels, xs, ys, val_idx, bs, device, cfg.max_length,
                               False) if n_val else train_loss
        scheduler.step(valid_loss)  # the tutorial steps the plateau scheduler on the valid loss, per epoch
        print(json.dumps({"epoch": epoch + 1, "train_loss": round(train_loss, 5), "valid_loss": round(valid_loss, 5),
                          "lrs": [pg["lr"] for pg in optimizer.param_groups],
                          "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    result = {"train_zero_shot": round(zero_shot(model, tok, labels, xs, ys, device, cfg.max_length), 4)}
    if a.test_root:
        tl, txs, tys = load_folders(Path(a.test_root), cfg.image.image_size)
        if tl != labels:
            raise SystemExit(f"test classes {tl} differ from train classes {labels}")
        result["test_zero_shot"] = round(zero_shot(model, tok, labels, txs, tys, device, cfg.max_length), 4)
        result["chance"] = round(1 / len(labels), 4)
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch reference of the Simple CLIP tutorial recipe (clipmine).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("params", help="parameter counts per part, as JSON")
    add_model_args(p)
    p.set_defaults(fn=cmd_params)

    p = sub.add_parser("names", help="list parameter/buffer names and shapes (optionally save safetensors)")
    add_model_args(p)
    p.add_argument("--filter", help="only names containing this")
    p.add_argument("--limit", type=int)
    p.add_argument("--save", help="write the (randomly initialised) state dict as safetensors")
    p.add_argument("--drop-num-batches-tracked", action="store_true",
                   help="leave BatchNorm's int64 step counters out of --save (the Rust port has none)")
    p.set_defaults(fn=cmd_names)

    p = sub.add_parser("bench", help="time training steps on random data; one JSON line")
    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("bench-infer", help="time the image and the text embeddings (eval mode) on random data; "
                                           "one JSON line")
    add_bench_args(p)
    p.set_defaults(fn=cmd_bench_infer)

    p = sub.add_parser("train-folders", help="train on root/<label>/*.png; zero-shot accuracy")
    add_model_args(p)
    p.add_argument("--root", required=True)
    p.add_argument("--test-root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.set_defaults(fn=cmd_train_folders)

    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
