#!/usr/bin/env python3
"""Makes the pretrained-tower fixtures of clipmine's tests: tiny random timm ResNets, a tiny
Hugging Face DistilBERT and a tiny BERT, laid out exactly like the Hugging Face cache
(`models--org--name/refs/main`, `snapshots/<rev>/...`), with their outputs on fixed inputs.

    python3 xtask/reference/make_pretrained_fixtures.py [OUT]

OUT defaults to crates/clip-core/tests/fixtures/pretrained. The Rust tests
(crates/clip-core/tests/pretrained.rs) load each model through clipmine's real loading code
(HF_HUB_OFFLINE=1, HF_HUB_CACHE at a copy of OUT/hub) and compare with `outputs.safetensors`.

Every weight is random (torch.manual_seed(0)), BatchNorm statistics included, so a wrong name
mapping or a mis-ordered tensor shows as a large difference. Everything together stays far
under 2 MB.

Files per repo (as the Hub has them):
  timm:        config.json (architecture + model_args + pretrained_cfg), model.safetensors
               (bare timm names, with `fc.*` and `num_batches_tracked` that clipmine ignores)
  distilbert:  config.json, model.safetensors (DistilBertForMaskedLM: `distilbert.*` + `vocab_*`),
               tokenizer.json (a WordPiece vocabulary of a few dozen words)
  bert:        config.json, model.safetensors (BertForPreTraining: `bert.*`, pooler, `cls.*`, and a
               `position_ids` buffer as older checkpoints have), vocab.txt + tokenizer_config.json
               only (clipmine builds the tokenizer from the vocabulary)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REV = "0123456789abcdef0123456789abcdef01234567"
SENTENCES = ["a photo of a cat", "a dog on the grass, running", "人蔘 and 枸杞"]
WORDS = (
    "a photo of the cat dog on grass running and red blue small big picture with in is "
    "camera horse rocket coffee cup brick wall"
).split()


def snapshot(out: Path, repo: str) -> Path:
    org, name = repo.split("/")
    root = out / "hub" / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def randomise_(model: torch.nn.Module) -> None:
    """Random values everywhere (timm zero-initialises the last BatchNorm of each block)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("bn1.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def make_resnet(out: Path, repo: str, arch: str, model_args: dict) -> None:
    import timm
    from timm.models._hub import save_config_for_hf

    model = timm.create_model(arch, pretrained=False, num_classes=10, **model_args)
    randomise_(model)
    model.eval()
    snap = snapshot(out, repo)
    save_config_for_hf(model, str(snap / "config.json"), model_args=model_args)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snap / "model.safetensors"))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    save_file({"input": x, "pooled": pooled.contiguous()}, str(snap.parent.parent / "outputs.safetensors"))
    print(f"{repo}: {arch} {model_args} pooled {tuple(pooled.shape)}")


def write_vocab(path: Path) -> list[str]:
    chars = sorted(set("".join(SENTENCES)) - set(" ,"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [",", "."] + ["##s", "##ing"]
    # Only one of the two CJK pairs: 人蔘 is known, 枸杞 becomes [UNK].
    vocab += [c for c in chars if c in "人蔘" and c not in vocab]
    path.write_text("\n".join(vocab) + "\n")
    return vocab


def bert_tokenizer(vocab_file: Path):
    """BERT's WordPiece pipeline from a vocab.txt, through the `tokenizers` library."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    t = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=t._tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def text_outputs(model, tok, snap: Path) -> None:
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    save_file(
        {
            "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
            "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
            "last_hidden_state": h.contiguous(),
            "cls": h[:, 0].contiguous(),
            "mean": mean.contiguous(),
        },
        str(snap.parent.parent / "outputs.safetensors"),
    )


def make_distilbert(out: Path, repo: str) -> None:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    snap = snapshot(out, repo)
    tmp = snap / "_vocab.txt"
    vocab = write_vocab(tmp)
    tok = bert_tokenizer(tmp)
    tok.backend_tokenizer.save(str(snap / "tokenizer.json"))
    tmp.unlink()
    cfg = DistilBertConfig(
        vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40,
        activation="gelu", dropout=0.1, attention_dropout=0.1,
    )
    torch.manual_seed(0)
    full = DistilBertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for n, p in full.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n:
                p.add_(torch.randn(p.shape) * 0.1)
    full.config.to_json_file(str(snap / "config.json"))
    save_file({k: v.clone().contiguous() for k, v in full.state_dict().items()}, str(snap / "model.safetensors"))
    text_outputs(full.distilbert, tok, snap)
    print(f"{repo}: DistilBERT vocab {len(vocab)}")


def make_bert(out: Path, repo: str) -> None:
    from transformers import BertConfig, BertForPreTraining

    snap = snapshot(out, repo)
    vocab = write_vocab(snap / "vocab.txt")
    (snap / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 40}))
    tok = bert_tokenizer(snap / "vocab.txt")
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu_new",
        layer_norm_eps=1e-7,
    )
    torch.manual_seed(0)
    full = BertForPreTraining(cfg).eval()
    with torch.no_grad():
        for n, p in full.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn(p.shape) * 0.1)
    full.config.to_json_file(str(snap / "config.json"))
    state = {k: v.clone().contiguous() for k, v in full.state_dict().items()}
    # Older checkpoints (all-MiniLM-L6-v2 among them) carry this buffer; clipmine ignores it.
    state["bert.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    save_file(state, str(snap / "model.safetensors"))
    text_outputs(full.bert, tok, snap)
    print(f"{repo}: BERT vocab {len(vocab)} (gelu_new, eps 1e-7)")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "crates/clip-core/tests/fixtures/pretrained"
    shutil.rmtree(out / "hub", ignore_errors=True)
    make_resnet(out, "clipmine-test/tiny-resnet-basic", "resnet18",
                {"layers": [1, 1, 1, 1], "channels": [8, 16, 24, 32]})
    make_resnet(out, "clipmine-test/tiny-resnet-bottleneck", "resnet50",
                {"layers": [1, 2, 1, 1], "channels": [4, 8, 12, 16]})
    make_distilbert(out, "clipmine-test/tiny-distilbert")
    make_bert(out, "clipmine-test/tiny-bert")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
