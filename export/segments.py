"""The UNet as consecutive segments, for the engine's low-memory mode.

`--low-memory` holds one component at a time; in float32 the UNet alone is most of the peak
(SD1.5: 3.2 GiB of weights). Split into segments that run one after the other, the engine
loads one segment, runs it, frees it and loads the next, so a step holds the largest segment's
weights instead of all of them, and pays a reload of the UNet per step.

The segments are graphs only: each `segment_K.onnx` sits beside the UNet's `model.onnx` and
points into the same `model.onnx_data`, so they add no weights on disk. They are cut where a
top-level block of the UNet starts (`down_blocks.1`, `mid_block`, `up_blocks.0`, ...: the first
node reading one of its weights), at the cuts that make the largest segment's weights smallest.
What crosses a cut (the hidden states, the skip connections, the time embedding) becomes an
output of one segment and an input of a later one, under its name in the whole graph; the
graph's own inputs go to the segments that read them. An overridable initializer of the graph
(an initializer also declared as a graph input: the LoRA slots, export/lora_slots.py) stays
one in every segment that reads it, declared as that segment's input too, after the others,
so each segment can be fed the slot tensors it uses. The manifest lists the files under the
component's `segments`, in running order.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
from typing import Any

from export.errors import UserError
from export.layout import MANIFEST_FILE, ONNX_FILE

log = logging.getLogger("export")

SEGMENT_FILE = "segment_{}.onnx"
# Two halves take SD1.5's float32 UNet from 3.2 GiB of weights at once to 1.9 (1.3 + 1.9).
DEFAULT_PARTS = 2
BLOCK_CONTAINERS = ("down_blocks", "up_blocks")


def _block(weight: str) -> str:
    """The top-level block a weight belongs to: `down_blocks.1`, `mid_block`, `conv_in` ..."""
    parts = weight.split(".")
    if parts[0] in BLOCK_CONTAINERS and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _numel_bytes(init: Any) -> int:
    from onnx import helper

    n = 1
    for d in init.dims:
        n *= d
    return n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _consumed(node: Any) -> list[str]:
    """Every value `node` reads, including those its subgraphs read from the outer scope."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input}
            inner |= {i.name for i in g.initializer}
            for n in g.node:
                names.extend(x for x in _consumed(n) if x not in inner)
    return names


def plan_cuts(model: Any, parts: int) -> list[int]:
    """Node indices where segments 1.. start: block starts that minimise the largest segment's
    weight bytes (ties: the earliest cuts)."""
    graph = model.graph
    size = {i.name: _numel_bytes(i) for i in graph.initializer}
    starts: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for name in node.input:
            if name in size:
                starts.setdefault(_block(name), idx)
    candidates = sorted(set(starts.values()) - {min(starts.values(), default=0)})
    if len(candidates) < parts - 1:
        raise ValueError(
            f"the graph has {len(candidates) + 1} top-level blocks, too few for {parts} segments"
        )
    # Bytes of the weights first read by each node: a segment's weights are those its nodes read.
    first_read = [0] * (len(graph.node) + 1)
    seen: set[str] = set()
    for idx, node in enumerate(graph.node):
        for name in node.input:
            if name in size and name not in seen:
                seen.add(name)
                first_read[idx] += size[name]
    prefix = list(itertools.accumulate(first_read, initial=0))
    best: tuple[int, list[int]] | None = None
    for cuts in itertools.combinations(candidates, parts - 1):
        bounds = [0, *cuts, len(graph.node)]
        largest = max(prefix[b] - prefix[a] for a, b in itertools.pairwise(bounds))
        if best is None or largest < best[0]:
            best = (largest, list(cuts))
    assert best is not None
    return best[1]


def _value_infos(model: Any) -> dict[str, Any]:
    """Type (and shape where known) of every value in the graph, inferring what is missing."""
    import onnx

    graph = model.graph
    infos = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    produced = {o for n in graph.node for o in n.output if o}
    if not produced <= infos.keys():
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
        for v in inferred.graph.value_info:
            infos.setdefault(v.name, v)
    return infos


def split(model: Any, parts: int) -> list[Any]:
    """`model` (weights external) as `parts` consecutive segment models."""
    from onnx import helper

    if parts < 2:
        raise ValueError("a split needs at least 2 segments")
    graph = model.graph
    cuts = plan_cuts(model, parts)
    bounds = [0, *cuts, len(graph.node)]
    initializers = {i.name: i for i in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    overridable = {i.name for i in graph.input if i.name in initializers}
    graph_outputs = [o.name for o in graph.output]
    infos = _value_infos(model)
    produced_in: dict[str, int] = {}
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        for node in graph.node[a:b]:
            for o in node.output:
                if o:
                    produced_in[o] = k
    read_by: list[set[str]] = []
    for a, b in itertools.pairwise(bounds):
        reads: set[str] = set()
        for node in graph.node[a:b]:
            reads.update(_consumed(node))
        read_by.append(reads)

    segments = []
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        nodes = graph.node[a:b]
        reads = read_by[k]
        own = {o for n in nodes for o in n.output if o}
        inputs = [n for n in graph_inputs if n in reads]
        inputs += sorted(
            n for n in reads if n not in own and n not in initializers and n not in inputs
        )
        later = set().union(*read_by[k + 1 :], graph_outputs)
        outputs = [n for n in graph_outputs if n in own]
        outputs += sorted(n for n in own if n in later and n not in graph_outputs)
        missing = [n for n in [*inputs, *outputs] if n not in infos]
        if missing:
            raise ValueError(f"no type known for {', '.join(missing[:3])}")
        for n in inputs:
            if n not in graph_inputs and produced_in.get(n, k) >= k:
                raise ValueError(f"segment {k} reads '{n}' before it is computed")
        seg_inits = sorted(reads & initializers.keys())
        inputs += [n for n in seg_inits if n in overridable]
        seg_graph = helper.make_graph(
            list(nodes),
            f"{graph.name or 'graph'}_segment_{k}",
            [infos[n] for n in inputs],
            [infos[n] for n in outputs],
            initializer=[initializers[n] for n in seg_inits],
        )
        seg = helper.make_model(
            seg_graph,
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
        )
        seg.functions.extend(model.functions)
        segments.append(seg)
    # Every graph output must come out of some segment, every segment input from the graph or
    # an earlier segment.
    out = {o.name for s in segments for o in s.graph.output}
    if not set(graph_outputs) <= out:
        raise ValueError("the segments do not produce every output of the graph")
    return segments


def write_segments(component_dir: pathlib.Path, parts: int, onnx_file: str) -> list[str]:
    """Split `component_dir/onnx_file` into `parts` segment files beside it (same external
    data); returns their file names in running order. Earlier segment files are replaced."""
    import onnx

    model = onnx.load(str(component_dir / onnx_file), load_external_data=False)
    segments = split(model, parts)
    remove_segments(component_dir)
    names = []
    for k, seg in enumerate(segments):
        name = SEGMENT_FILE.format(k)
        onnx.save(seg, str(component_dir / name))
        names.append(name)
    return names


def remove_segments(component_dir: pathlib.Path) -> None:
    for old in component_dir.glob(SEGMENT_FILE.format("*")):
        old.unlink()


def segment_files(component_dir: pathlib.Path) -> list[str]:
    """The segment files in `component_dir`, in running order."""
    found = []
    for path in component_dir.glob(SEGMENT_FILE.format("*")):
        index = path.stem.removeprefix("segment_")
        if index.isdigit():
            found.append((int(index), path.name))
    return [name for _, name in sorted(found)]


def write_unet_segments(unet_dir: pathlib.Path, parts: int = DEFAULT_PARTS) -> list[str]:
    """`convert`'s step: the exported UNet in `parts` segments; none (with a warning) when the
    graph has too few blocks to cut."""
    try:
        names = write_segments(unet_dir, parts, ONNX_FILE)
    except ValueError as exc:
        log.warning("unet: no segments for low-memory mode: %s", exc)
        return []
    log.info("unet: %d segments for low-memory mode", len(names))
    return names


def segment_model_dir(model_dir: pathlib.Path, parts: int) -> list[str]:
    """`python -m export segment`: (re)write the UNet segments of a model directory and list
    them in its manifest; `parts == 1` removes them."""
    manifest_path = model_dir / MANIFEST_FILE
    unet_dir = model_dir / "unet"
    if not (unet_dir / ONNX_FILE).is_file():
        raise UserError(f"{model_dir}: no unet/{ONNX_FILE}; pass a directory written by `convert`")
    if not manifest_path.is_file():
        raise UserError(
            f"{model_dir}: no {MANIFEST_FILE}, where the engine finds the segments; export the "
            "model with `python -m export convert`"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if parts == 1:
        remove_segments(unet_dir)
        names: list[str] = []
    else:
        try:
            names = write_segments(unet_dir, parts, ONNX_FILE)
        except ValueError as exc:
            raise UserError(f"{unet_dir / ONNX_FILE}: {exc}") from exc
    unet = manifest.setdefault("components", {}).setdefault("unet", {})
    if names:
        unet["segments"] = names
    else:
        unet.pop("segments", None)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("%s: unet in %s", model_dir, f"{len(names)} segments" if names else "one piece")
    return names
