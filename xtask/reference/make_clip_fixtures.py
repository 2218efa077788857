#!/usr/bin/env python3
"""Makes the pretrained-CLIP fixtures of clipmine's tests: tiny random CLIP checkpoints built with
the real libraries, in the layouts users download, with their own outputs on fixed inputs.

    pip install torch open_clip_torch transformers
    python3 xtask/reference/make_clip_fixtures.py [OUT]

OUT defaults to crates/clip-core/tests/fixtures/clip. Every checkpoint is laid out as the
Hugging Face cache (`hub/models--test--NAME/{refs/main,snapshots/<rev>/…}`); the Rust tests
(crates/clip-core/tests/clip_checkpoints.rs) load each through clipmine's real loading code,
from the cache (HF_HUB_OFFLINE=1) and from a plain folder, and compare with `goldens/*`.

  oc-vit     open_clip ViT, QuickGELU, `tok` pool: open_clip_config.json +
             open_clip_model.safetensors (fp16, as OpenAI's weights), no tokenizer files
             (so OpenAI's BPE vocabulary is used, as for timm/vit_base_patch32_clip_224.openai)
  oc-vit-avg open_clip ViT, erf GELU, `avg` pool, open_clip_pytorch_model.bin (fp16)
  oc-rn      open_clip ModifiedResNet (RN50's design at width 8), erf GELU text tower,
             open_clip_pytorch_model.bin (fp16)
  hf-clip    transformers CLIPModel: config.json + model.safetensors + tokenizer.json (a cut
             BPE vocabulary, so pooling takes the `eos_token_id` branch) + preprocessor_config.json
  hf-clip-bin  the same with pytorch_model.bin instead of model.safetensors (older Hub repos)
  cn-clip    transformers ChineseCLIPModel: BERT text tower (WordPiece vocab.txt + tokenizer.json)
             with a CLIP ViT

Weights are random but rounded to fp16 first, so the fp16 files hold exactly the weights the
goldens were computed with. Everything together stays under 2 MB.

The goldens: `goldens/tokens.json` (open_clip SimpleTokenizer and HF tokenizer ids of the cases
below) and `goldens/NAME.safetensors` (`pixels`: the normalised input, `image`: image embeddings,
`ids`: the token ids fed, `text`: text embeddings, `logit_scale`).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

REV = "89abcdef0123456789abcdef0123456789abcdef"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CASES = [
    "a photo of a cat",
    "A Photo  of a   DOG!",
    "人蔘",
    "韓國人蔘 and 枸杞, 銀川枸杞",
    "it's a dog's life, isn't it?",
    "naïve café — 3 emojis 🐱🐶🌿",
    "numbers 1234 and 3.14",
    "  leading and trailing  ",
    "over-long " + " ".join(f"word{i}" for i in range(100)),
]


def snapshot(out: Path, name: str) -> Path:
    root = out / "hub" / f"models--test--{name}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    return snap


def randomise_(model: torch.nn.Module) -> None:
    """Random values everywhere (LayerNorm and BatchNorm too), rounded to fp16, so a wrong name
    mapping or a mis-ordered tensor shows as a large difference."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                v = torch.rand(t.shape, generator=g) + 0.5
            elif "logit_scale" in name:
                v = torch.full(t.shape, 2.0)
            elif t.dim() >= 2 and "embedding" not in name:
                # Scaled by fan-in, so activations stay near 1 through every layer.
                v = torch.randn(t.shape, generator=g) / (t[0].numel() ** 0.5)
            else:
                v = torch.randn(t.shape, generator=g) * 0.5
            t.copy_(v.half().float())


def images(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]


def save_images(out: Path, size: int) -> torch.Tensor:
    """Writes goldens/image{size}_{i}.png and returns them normalised (N, 3, S, S)."""
    xs = []
    for i, a in enumerate(images(size)):
        Image.fromarray(a).save(out / "goldens" / f"image{size}_{i}.png")
        x = torch.from_numpy(a).float().permute(2, 0, 1) / 255.0
        xs.append((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
    return torch.stack(xs)


def pad_rows(rows: list[list[int]], pad: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (n - len(r)) for r in rows])


def open_clip_model(out: Path, name: str, cfg: dict, weights: str, half: bool) -> None:
    cfgs = out / "_cfgs"
    cfgs.mkdir(exist_ok=True)
    arch = f"Tiny-{name}"
    (cfgs / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfgs))
    model = open_clip.create_model(arch, pretrained=None).eval()
    randomise_(model)
    snap = snapshot(out, name)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if half:
        sd = {k: (v.half() if v.is_floating_point() and v.dim() > 0 else v) for k, v in sd.items()}
    if weights.endswith(".safetensors"):
        save_file(sd, snap / weights)
    else:
        torch.save(sd, snap / weights)
    pre = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=2))
    # The round trip through open_clip's own loader.
    again = open_clip.create_model(f"local-dir:{snap}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{snap}")
    pixels = save_images(out, cfg["vision_cfg"]["image_size"])
    ids = tok(CASES)
    with torch.no_grad():
        img = again.encode_image(pixels)
        txt = again.encode_text(ids)
    save_file(
        {
            "pixels": pixels,
            "image": img.float().contiguous(),
            "ids": ids.to(torch.int64),
            "text": txt.float().contiguous(),
            "logit_scale": again.logit_scale.detach().reshape(1).float(),
        },
        out / "goldens" / f"{name}.safetensors",
    )


def bpe_files(dirpath: Path, merges_kept: int | None):
    """vocab.json + merges.txt of OpenAI's BPE (cut to its first `merges_kept` merges)."""
    st = open_clip.tokenizer.SimpleTokenizer()
    ranks = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    if merges_kept is not None:
        ranks = ranks[:merges_kept]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m, _ in ranks]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dirpath / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dirpath / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranks))
    return len(vocab)


def hf_clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    snap = snapshot(out, "hf-clip")
    n_vocab = bpe_files(snap, 400)
    tok = CLIPTokenizerFast.from_pretrained(str(snap))
    tok.save_pretrained(str(snap))
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json"]:
        (snap / f).unlink(missing_ok=True)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPConfig(
        projection_dim=16,
        text_config=dict(vocab_size=n_vocab, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                         bos_token_id=eos - 1, pad_token_id=eos, hidden_act="gelu"),
        vision_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, hidden_act="quick_gelu"),
    )
    model = CLIPModel(cfg).eval()
    randomise_(model)
    model.save_pretrained(str(snap))
    (snap / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True}, indent=2))
    goldens(out, "hf-clip", model, tok, 32, pad=eos)
    # The same checkpoint as older Hub repos hold it: PyTorch's pickle instead of safetensors.
    old = snapshot(out, "hf-clip-bin")
    for f in snap.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, old / f.name)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, old / "pytorch_model.bin")


def cn_clip(out: Path) -> None:
    from transformers import BertTokenizerFast, ChineseCLIPConfig, ChineseCLIPModel

    snap = snapshot(out, "cn-clip")
    words = ("a photo of the cat dog 's it isn ' t life , ? ! . - and numbers 12 ##34 3 14 "
             "over long word ##1 ##2 ##3 lead ##ing trail emo ##jis na ##ive cafe").split()
    chars = list("人蔘韓國枸杞銀川的一張照片") + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(dict.fromkeys(words + chars))
    (snap / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(snap / "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True)
    tok.save_pretrained(str(snap))
    (snap / "special_tokens_map.json").unlink(missing_ok=True)
    cfg = ChineseCLIPConfig(
        projection_dim=16,
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, type_vocab_size=2),
        vision_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, hidden_act="quick_gelu"),
    )
    model = ChineseCLIPModel(cfg).eval()
    randomise_(model)
    model.save_pretrained(str(snap))
    (snap / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ChineseCLIPImageProcessor", "size": {"height": 32, "width": 32},
        "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": list(MEAN), "image_std": list(STD)}, indent=2))
    goldens(out, "cn-clip", model, tok, 32, pad=0, max_length=52)


def goldens(out: Path, name: str, model, tok, size: int, pad: int, max_length: int = 77) -> None:
    pixels = save_images(out, size)
    enc = tok(CASES, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    save_file(
        {
            "pixels": pixels,
            "image": img.float().contiguous(),
            "ids": enc["input_ids"].to(torch.int64),
            "mask": enc["attention_mask"].to(torch.int64),
            "text": txt.float().contiguous(),
            "logit_scale": model.logit_scale.detach().reshape(1).float(),
        },
        out / "goldens" / f"{name}.safetensors",
    )


def token_goldens(out: Path) -> None:
    """Ids of every case: open_clip's SimpleTokenizer (context 77, zero padding) and the HF
    tokenizers of hf-clip and cn-clip (no padding), as Python computes them."""
    from transformers import AutoTokenizer

    st = open_clip.tokenizer.SimpleTokenizer()
    oc = [[i for i in row if i != 0] for row in st(CASES).tolist()]
    hf = AutoTokenizer.from_pretrained(str(out / "hub/models--test--hf-clip/snapshots" / REV))
    cn = AutoTokenizer.from_pretrained(str(out / "hub/models--test--cn-clip/snapshots" / REV))
    doc = {
        "cases": CASES,
        "open_clip": oc,
        "hf-clip": [hf(c, truncation=True, max_length=77)["input_ids"] for c in CASES],
        "cn-clip": [cn(c, truncation=True, max_length=52)["input_ids"] for c in CASES],
    }
    (out / "goldens" / "tokens.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/clip-core/tests/fixtures/clip")
    (out / "goldens").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = {"image_size": 32, "layers": 2, "width": 16, "patch_size": 16, "head_width": 8}
    text = {"context_length": 77, "vocab_size": 49408, "width": 4, "heads": 2, "layers": 2}
    open_clip_model(out, "oc-vit", {"embed_dim": 16, "quick_gelu": True, "vision_cfg": vit, "text_cfg": text},
                    "open_clip_model.safetensors", half=True)
    open_clip_model(out, "oc-vit-avg", {"embed_dim": 16, "quick_gelu": False,
                                        "vision_cfg": {**vit, "pool_type": "avg"}, "text_cfg": text},
                    "open_clip_pytorch_model.bin", half=True)
    rn = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    open_clip_model(out, "oc-rn", {"embed_dim": 16, "quick_gelu": False, "vision_cfg": rn, "text_cfg": text},
                    "open_clip_pytorch_model.bin", half=True)
    hf_clip(out)
    cn_clip(out)
    token_goldens(out)
    shutil.rmtree(out / "_cfgs", ignore_errors=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
