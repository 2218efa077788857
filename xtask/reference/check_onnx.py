"""Checks a clipmine ONNX export with the real runtime: `onnx.checker` on both graphs, then ONNX
Runtime's embeddings of given inputs, printed as JSON for the caller to compare with clipmine's.

    python xtask/reference/check_onnx.py EXPORT_DIR INPUTS.json

INPUTS.json holds `pixel_values` (N×3×S×S nested lists, normalised as clip.json says) and
`input_ids`, `attention_mask` (N×L nested lists of ints). Prints one JSON object:
`image_embeds`, `text_embeds` (nested lists), `opset`, and each graph's input and output names,
element types and shapes (a free axis by its name).

The clip-predict ONNX tests (crates/clip-predict/tests/onnx.rs) run it per tower kind and compare
with `ClipModel::embed_images` / `embed_texts`. Needs: pip install onnxruntime onnx numpy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def describe(values) -> list[dict]:
    """Names, element types and shapes of a graph's inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "elem_type": onnx.TensorProto.DataType.Name(t.elem_type), "shape": dims})
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: check_onnx.py EXPORT_DIR INPUTS.json")
    folder, inputs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    report: dict = {"graphs": {}}
    sessions = {}
    for name in ("image_encoder", "text_encoder"):
        path = folder / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        report["opset"] = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][0]
        report["graphs"][name] = {
            "inputs": describe(model.graph.input),
            "outputs": describe(model.graph.output),
        }
        sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.asarray(inputs["pixel_values"], dtype=np.float32)
    (image,) = sessions["image_encoder"].run(None, {"pixel_values": pixels})
    feed = {k: np.asarray(inputs[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    (text,) = sessions["text_encoder"].run(None, feed)
    report["image_embeds"] = image.tolist()
    report["text_embeds"] = text.tolist()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
