"""Goldens for clipmine's image preprocessing against transformers' CLIPImageProcessor.

A non-square photo (the demo's coffee.jpg, downsized to 96×64 and stored as PNG so that both
sides decode the same pixels) prepared by CLIPImageProcessor with a shortest edge larger than the
crop, for each resample filter clipmine follows. Writes
crates/clip-core/tests/fixtures/clip/goldens/processor.json and processor_photo.png.

    pip install transformers pillow numpy
    python xtask/reference/make_processor_goldens.py
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/clip-core/tests/fixtures/clip/goldens"
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]

photo = Image.open(ROOT / "assets/demo/images/coffee.jpg").convert("RGB").resize((96, 64), Image.BICUBIC)
photo.save(OUT / "processor_photo.png")
photo = Image.open(OUT / "processor_photo.png").convert("RGB")

cases = []
for shortest_edge, resample in [(40, 3), (40, 2), (32, 3)]:
    proc = CLIPImageProcessor(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": 32, "width": 32},
        resample=resample,
        image_mean=MEAN,
        image_std=STD,
    )
    px = proc(images=photo, return_tensors="np")["pixel_values"][0]
    assert px.shape == (3, 32, 32), px.shape
    cases.append({
        "shortest_edge": shortest_edge,
        "resample": resample,
        "pixels": [round(float(v), 6) for v in px.astype(np.float64).ravel()],
    })
(OUT / "processor.json").write_text(json.dumps({"photo": "processor_photo.png", "crop": 32, "cases": cases}))
print("wrote", OUT / "processor.json")
