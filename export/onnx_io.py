"""Shared ONNX export machinery: one `torch.onnx.export` call per component.

Every component is exported the same way so the engine can rely on these properties:

* initializer names are the PyTorch parameter names of the exported module (LoRA deltas are
  applied by name at session creation), which is why the graph is exported with
  ``dynamo=True, optimize=False`` (no constant folding, no fusion renaming weights) and the
  wrapper's attribute prefix is stripped afterwards;
* dynamic axes carry readable names (``batch``, ``height``, ``width`` ...), not the exporter's
  ``s17`` symbols;
* weights live in one external data file ``model.onnx_data`` next to ``model.onnx``;
* initializers named in `overridable` (LoRA slots, export/lora_slots.py) are also graph inputs,
  so ONNX Runtime lets a run feed them; every other initializer is a plain one.
"""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch

from export.attention import TRANSLATIONS, fused_attention
from export.layout import DATA_FILE, ONNX_FILE

EXPORT_METHOD = "torch.onnx.export(dynamo=True, optimize=False)"


@dataclass
class Io:
    """One graph input or output: its name and the names of its dynamic axes."""

    name: str
    axes: dict[int, str] = field(default_factory=dict)


def _rename_initializers(
    model: onnx.ModelProto, prefix: str, rename: Callable[[str], str] | None = None
) -> None:
    """Strip the wrapper's attribute `prefix` from initializer names and their uses, then apply
    `rename` (e.g. export.lora_slots.slot_param_name) to the result."""
    if not prefix and rename is None:
        return
    mapping: dict[str, str] = {}
    for init in model.graph.initializer:
        name = init.name[len(prefix) :] if prefix and init.name.startswith(prefix) else init.name
        if rename is not None:
            name = rename(name)
        if name != init.name:
            mapping[init.name] = name
            init.name = name
    if len(set(mapping.values())) != len(mapping):
        raise RuntimeError("renaming initializers made two of them share a name")

    def fix(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in mapping:
                    node.input[i] = mapping[name]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)
                for g in attr.graphs:
                    fix(g)
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            if vi.name in mapping:
                vi.name = mapping[vi.name]

    fix(model.graph)


def expose_initializers(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Declare the initializers `names` as graph inputs too (same name, element type and
    shape), after the real inputs: ONNX Runtime's overridable initializers, which keep their
    stored value unless a run feeds them. The initializers themselves are unchanged."""
    if not names:
        return
    if model.ir_version < 4:
        raise ValueError(f"overridable initializers need ONNX IR >= 4, not {model.ir_version}")
    inits = {i.name: i for i in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ValueError(f"no initializer named {', '.join(missing[:3])}")
    declared = {i.name for i in model.graph.input}
    for name in names:
        if name in declared:
            continue
        init = inits[name]
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims))
        )
        declared.add(name)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces and scopes: they are most of a small graph's bytes."""

    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)
        for vi in graph.value_info:
            del vi.metadata_props[:]

    strip(model.graph)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]


def _name_axes(model: onnx.ModelProto, inputs: Sequence[Io], outputs: Sequence[Io]) -> None:
    """Replace the exporter's symbolic dims with the contract's axis names."""
    symbols: dict[str, str] = {}
    by_name = {vi.name: vi for vi in model.graph.input}
    for io in inputs:
        dims = by_name[io.name].type.tensor_type.shape.dim
        for axis, label in io.axes.items():
            d = dims[axis]
            if d.HasField("dim_param"):
                symbols.setdefault(d.dim_param, label)
            d.dim_param = label

    for vi in list(model.graph.value_info) + list(model.graph.input):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]

    out_by_name = {vi.name: vi for vi in model.graph.output}
    for io in outputs:
        dims = out_by_name[io.name].type.tensor_type.shape.dim
        for d in dims:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]
        for axis, label in io.axes.items():
            dims[axis].dim_param = label


def _dynamic_shapes(wrapper: torch.nn.Module, inputs: Sequence[Io]) -> dict[str, Any]:
    """torch.export's `dynamic_shapes`, keyed by the wrapper's `forward` parameters: one per
    input, and a tuple for a `*args` parameter taking the remaining inputs (a variable number
    of graph inputs, e.g. the UNet's ControlNet residuals)."""
    specs = [{axis: torch.export.Dim.AUTO for axis in io.axes} or None for io in inputs]
    out: dict[str, Any] = {}
    i = 0
    for param in inspect.signature(wrapper.forward).parameters.values():
        if i == len(specs):
            break
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out[param.name] = tuple(specs[i:])
            i = len(specs)
            break
        if param.name != inputs[i].name:
            raise ValueError(f"input {inputs[i].name!r} is forward's parameter {param.name!r}")
        out[param.name] = specs[i]
        i += 1
    if i != len(specs):
        raise ValueError(f"forward takes fewer than {len(specs)} inputs")
    return out


def _capture(wrapper: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any) -> Any:
    """The module as `torch.export` captures it (non-strict), or the module itself for
    `torch.onnx.export` to capture when that fails.

    `torch.onnx.export` tries non-strict capture with size-oblivious shapes first, and for
    diffusers' UNets that fails on the upsampling blocks' shape checks after tracing most of
    the model; its strict (dynamo) fallback then traces it all again, slower. Plain non-strict
    capture takes those checks as guards on the example sizes, which the exported dynamic axes
    keep covering (every size is a multiple of the UNet's overall downsampling factor).
    """
    try:
        return torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:  # noqa: BLE001 - any capture failure falls back to the exporter's own
        return wrapper


def export_component(
    wrapper: torch.nn.Module,
    args: tuple[Any, ...],
    inputs: Sequence[Io],
    outputs: Sequence[Io],
    out_dir: pathlib.Path,
    opset: int,
    prefix: str,
    rename: Callable[[str], str] | None = None,
    attention: str = "fused",
    translations: dict[Any, Callable[..., Any]] | None = None,
    overridable: Sequence[str] = (),
) -> onnx.ModelProto:
    """Export `wrapper(*args)` to `out_dir/model.onnx` (+ `model.onnx_data`).

    `prefix` is the wrapper attribute holding the real module (e.g. ``"unet."``); it is
    removed from initializer names so they match the module's own `named_parameters()`.
    `rename` then maps those names to the exported ones (LoRA slots drop peft's infixes).
    `attention`: `"fused"` exports diffusers' attention as `com.microsoft.MultiHeadAttention`
    nodes, `"plain"` as the exporter decomposes it (see export/attention.py).
    `translations` adds ONNX translations of ATen ops for this export (e.g. the motion UNet's
    `repeat_interleave`, export/animatediff.py) to the attention's.
    `overridable` names initializers (after `rename`) to declare as graph inputs too (see
    `expose_initializers`): the LoRA slots' tensors.
    """
    wrapper = wrapper.eval()
    dynamic_shapes = _dynamic_shapes(wrapper, inputs)
    with torch.no_grad(), fused_attention(wrapper, attention):
        program = torch.onnx.export(
            _capture(wrapper, args, dynamic_shapes),
            args,
            dynamo=True,
            optimize=False,
            opset_version=opset,
            input_names=[io.name for io in inputs],
            output_names=[io.name for io in outputs],
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={**TRANSLATIONS, **(translations or {})},
            verbose=False,
        )
    model = program.model_proto
    _strip_metadata(model)
    _rename_initializers(model, prefix, rename)
    _name_axes(model, inputs, outputs)
    expose_initializers(model, overridable)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (ONNX_FILE, DATA_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(out_dir / ONNX_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=0,
    )
    (out_dir / DATA_FILE).chmod(0o644)
    onnx.checker.check_model(str(out_dir / ONNX_FILE))
    return onnx.load(str(out_dir / ONNX_FILE), load_external_data=False)


_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BOOL: "bool",
}


def describe_io(path: pathlib.Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read a saved model's inputs and outputs: `{"inputs": {name: {dtype, shape}}, ...}`.

    Fixed dims are integers, dynamic dims their axis name. Overridable initializers (graph
    inputs that are also initializers: LoRA slots) are not listed: they need no feed.
    """
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def one(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        shape: list[int | str] = []
        for d in t.shape.dim:
            shape.append(d.dim_param if d.HasField("dim_param") else int(d.dim_value))
        return {"dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {
        "inputs": {vi.name: one(vi) for vi in model.graph.input if vi.name not in inits},
        "outputs": {vi.name: one(vi) for vi in model.graph.output},
    }


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point parameters (example inputs are made in it)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def weights_dtype(path: pathlib.Path) -> str:
    """The dtype most of a saved model's floating-point weights have, by element count
    (`"float16"` for a float16 export, whose few float32 constants do not count)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        name = _DTYPES.get(init.data_type)
        if name in ("float32", "float16", "bfloat16", "float64"):
            n = 1
            for d in init.dims:
                n *= d
            counts[name] = counts.get(name, 0) + n
    return max(counts, key=counts.__getitem__) if counts else "float32"


def initializer_names(path: pathlib.Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {init.name for init in model.graph.initializer}
