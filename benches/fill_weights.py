"""Writes random weights into the external-data files of a graph-only model directory.

A full-size SD export is ~4 GB (SD1.5) to ~14 GB (SDXL) of weights but only a few MB of graphs.
To benchmark on a machine that cannot run the exporter (no diffusers, no network), ship the model
directory without its `*.onnx_data` files and let this script recreate them: every external
initializer gets deterministic values at the offset and length its graph records. Floats are
N(0, 0.02) except normalisation scales (1) -- roughly what a trained network looks like to the
kernels, so timings are not flattered by zeros -- and integer buffers such as CLIP's
`position_ids` are `arange`. The images are noise: this is for timing only.

    python benches/fill_weights.py MODEL_DIR [--seed 0]
    python benches/fill_weights.py MODEL_DIR --write-spec   # before shipping, where onnx is

`--write-spec` stores each graph's external initializers (name, element type, shape, file,
offset, length) as `external_weights.json` next to its `model.onnx`; where that file exists the
fill needs only numpy, so the target machine needs no `onnx` package.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

SPEC_NAME = "external_weights.json"
# ONNX TensorProto element types.
DTYPES = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32}


def graph_spec(graph_path: pathlib.Path) -> list[dict]:
    """The external initializers of one graph, read with `onnx` (not loading the data)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(graph_path), load_external_data=False)
    spec = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        spec.append({
            "name": t.name, "data_type": t.data_type, "dims": list(t.dims),
            "location": info["location"], "offset": int(info.get("offset", 0)),
            "length": int(info["length"]) if "length" in info else None,
        })
    return spec


def values(t: dict, rng: np.random.Generator) -> np.ndarray:
    dtype = DTYPES.get(t["data_type"])
    if dtype is None:
        raise SystemExit(f"{t['name']}: unsupported element type {t['data_type']}")
    shape = tuple(t["dims"])
    if np.issubdtype(dtype, np.integer):
        if "position_ids" in t["name"] and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        return np.zeros(shape, dtype)
    leaf = t["name"].rsplit(".", 1)
    is_norm_scale = (
        len(shape) == 1 and leaf[-1] == "weight" and "norm" in t["name"].lower()
    )
    if is_norm_scale:
        return np.ones(shape, dtype)
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= 0.02
    return out.astype(dtype, copy=False)


def fill(graph_path: pathlib.Path, rng: np.random.Generator) -> int:
    stored = graph_path.parent / SPEC_NAME
    spec = json.loads(stored.read_text()) if stored.is_file() else graph_spec(graph_path)
    written = 0
    handles: dict[str, object] = {}
    try:
        for t in spec:
            location = graph_path.parent / t["location"]
            data = values(t, rng).tobytes()
            length = t["length"] if t["length"] is not None else len(data)
            if length != len(data):
                raise SystemExit(f"{t['name']}: {length} bytes recorded, {len(data)} computed")
            f = handles.get(str(location))
            if f is None:
                f = open(location, "wb")
                handles[str(location)] = f
            f.seek(t["offset"])
            f.write(data)
            written += len(data)
    finally:
        for f in handles.values():
            f.close()
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=pathlib.Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-spec", action="store_true",
                   help=f"only write {SPEC_NAME} next to each graph (needs onnx)")
    args = p.parse_args()
    graphs = sorted(args.model_dir.glob("*/model.onnx")) + sorted(args.model_dir.glob("model.onnx"))
    if not graphs:
        sys.exit(f"{args.model_dir}: no */model.onnx")
    if args.write_spec:
        for g in graphs:
            spec = graph_spec(g)
            (g.parent / SPEC_NAME).write_text(json.dumps(spec))
            print(f"{g.parent.name}: {len(spec)} external initializers", flush=True)
        return
    rng = np.random.default_rng(args.seed)
    for g in graphs:
        t0 = time.perf_counter()
        n = fill(g, rng)
        print(f"{g.parent.name}: {n / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
