#!/usr/bin/env python3
"""Regenerate the clipmine demo dataset (assets/demo/) from scikit-image's sample data.

The demo set is 10 small public-domain / CC0 photos taken from the ``skimage/data/``
folder that ships inside the scikit-image wheel, each with three short captions
(two in Traditional Chinese, one in English).  It is in the spirit of the classic
"4 photos of Chinese herbs captioned 人蔘, 韓國人蔘, 枸杞, 銀川枸杞" CLIP tutorial,
just a little larger and with freely licensed pictures.

Usage
-----
    python3 -m pip download --no-deps --only-binary=:all: -d /tmp/skw scikit-image==0.26.0
    cd /tmp/skw && unzip -q scikit_image-0.26.0-*.whl 'skimage/data/*' -d unpacked
    python3 make_demo.py /tmp/skw/unpacked            # writes next to this script
    python3 make_demo.py /tmp/skw/unpacked --out DIR  # or somewhere else

The first argument may be the unpacked wheel root (containing ``skimage/``), the
``skimage`` package folder, or ``skimage/data`` itself.

Requires Pillow (with WebP support) and numpy.  Source files are checked against
their SHA-256 from skimage 0.26.0's ``skimage/data/_registry.py``; pass
``--no-verify`` to use another scikit-image version.  Output bytes are stable for a
given Pillow version (encoders differ slightly between libjpeg/libwebp builds).

Processing, per image:
  * ICC profiles are honoured: rocket.jpg is Adobe RGB (1998) and is converted to
    sRGB; the others are sRGB already.  No ICC profile or EXIF is written out.
  * downscaled with Lanczos so the longer side is at most 256 px (aspect kept);
  * grey sources stay single-channel (mode "L"); horse.png (an RGBA silhouette) is
    flattened onto white and thresholded to a 1-bit PNG, as skimage.data.horse() does;
  * re-encoded as JPEG (quality 88, baseline, 4:2:0), PNG, or lossy WebP (quality 88),
    so the loader sees a mix of formats and channel layouts.

It also writes captions.csv (UTF-8, no BOM, "\\n" line endings, header
``image,caption``, one row per caption, image paths relative to images/).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, features

MAX_SIDE = 256
JPEG_QUALITY = 88
WEBP_QUALITY = 88

# SHA-256 of the source files, from skimage 0.26.0 skimage/data/_registry.py.
SOURCE_SHA256 = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "horse.png": "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}

# (output name, skimage source, how to treat it)
#   "rgb"  -> colour, "grey" -> single channel, "bilevel" -> 1-bit silhouette
IMAGES = [
    ("astronaut.jpg", "astronaut.png", "rgb"),
    ("coffee.jpg", "coffee.png", "rgb"),
    ("chelsea.webp", "chelsea.png", "rgb"),
    ("rocket.jpg", "rocket.jpg", "rgb"),
    ("hubble.jpg", "hubble_deep_field.jpg", "rgb"),
    ("retina.jpg", "retina.jpg", "rgb"),
    ("camera.jpg", "camera.png", "grey"),
    ("brick.png", "brick.png", "grey"),
    ("grass.jpg", "grass.png", "grey"),
    ("horse.png", "horse.png", "bilevel"),
]

# Three captions per image: two Traditional Chinese, one English.
CAPTIONS = {
    "astronaut.jpg": [
        "穿橙色太空衣的太空人",
        "微笑的女太空人",
        "an astronaut in an orange suit, with a helmet",
    ],
    "coffee.jpg": [
        "一杯咖啡",
        "紅色杯子裡的熱咖啡",
        "a cup of coffee on a saucer",
    ],
    "chelsea.webp": [
        "一隻虎斑貓",
        "貓的臉部特寫",
        "close-up of a tabby cat with green eyes",
    ],
    "rocket.jpg": [
        "發射台上的火箭",
        "夜空下準備升空的火箭",
        "a rocket on the launch pad at dusk",
    ],
    "hubble.jpg": [
        "深空中的無數星系",
        "哈伯望遠鏡拍攝的星空",
        "distant galaxies in the dark, deep sky",
    ],
    "retina.jpg": [
        "眼底視網膜照片",
        "紅色的視網膜與血管",
        "a fundus photo of a human retina",
    ],
    "camera.jpg": [
        "拿著相機的攝影師",
        "黑白照片中的男人與三腳架",
        "black and white photo of a cameraman",
    ],
    "brick.png": [
        "一面磚牆",
        "灰色的磚塊紋理",
        "a grey brick wall",
    ],
    "grass.jpg": [
        "一片草地",
        "黑白的草葉紋理",
        "close-up of grass, in grey tones",
    ],
    "horse.png": [
        "一匹馬的剪影",
        "白底黑色的馬",
        "black silhouette of a horse on white",
    ],
}


def find_data_dir(root: Path) -> Path:
    for cand in (root / "skimage" / "data", root / "data", root):
        if (cand / "astronaut.png").is_file():
            return cand
    sys.exit(f"error: no skimage data folder (with astronaut.png) under {root}")


def to_srgb(im: Image.Image) -> Image.Image:
    """Convert an RGB image with an embedded non-sRGB ICC profile to sRGB."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode != "RGB":
        return im
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if "sRGB" in ImageCms.getProfileDescription(src):
        return im
    dst = ImageCms.createProfile("sRGB")
    return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")


def downscale(im: Image.Image) -> Image.Image:
    w, h = im.size
    scale = MAX_SIDE / max(w, h)
    if scale >= 1:
        return im
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def load(path: Path, kind: str) -> Image.Image:
    im = Image.open(path)
    im.load()
    if kind == "rgb":
        return downscale(to_srgb(im.convert("RGB") if im.mode != "RGB" else im))
    if kind == "grey":
        return downscale(im.convert("L"))
    if kind == "bilevel":
        # Flatten RGBA onto white, go grey, resize, then threshold at 50 %.
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        grey = downscale(flat.convert("L"))
        arr = np.asarray(grey) >= 128
        return Image.fromarray(arr)  # bool array -> mode "1"
    raise ValueError(kind)


def save(im: Image.Image, out: Path) -> None:
    ext = out.suffix.lower()
    if ext == ".jpg":
        im.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=False)
    elif ext == ".png":
        im.save(out, "PNG", optimize=True)
    elif ext == ".webp":
        if not features.check("webp"):
            sys.exit("error: this Pillow cannot write WebP")
        im.save(out, "WEBP", quality=WEBP_QUALITY, method=6)
    else:
        raise ValueError(ext)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("skimage", type=Path, help="unpacked scikit-image wheel (or its skimage/data)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: the folder holding this script)")
    ap.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of sources")
    args = ap.parse_args()

    data = find_data_dir(args.skimage)
    img_dir = args.out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    for name, src, kind in IMAGES:
        path = data / src
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not args.no_verify and digest != SOURCE_SHA256[src]:
            sys.exit(f"error: {src} has sha256 {digest}, expected {SOURCE_SHA256[src]} "
                     "(different scikit-image version? use --no-verify)")
        im = load(path, kind)
        save(im, img_dir / name)
        size = (img_dir / name).stat().st_size
        print(f"{name:14s} <- {src:22s} {im.size[0]}x{im.size[1]} {im.mode:3s} {size:7d} B")

    assert set(CAPTIONS) == {n for n, _, _ in IMAGES}
    with open(args.out / "captions.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "caption"])
        for name, _, _ in IMAGES:
            for cap in CAPTIONS[name]:
                w.writerow([name, cap])
    print(f"wrote {args.out / 'captions.csv'} ({sum(map(len, CAPTIONS.values()))} captions)")


if __name__ == "__main__":
    main()
