"""`tcd_ort.json`: what the engine needs to know about a model directory without guessing.

The input/output names, dtypes and shapes are read back from the saved ONNX files, so the
manifest always describes the graphs that are actually there. Dynamic dims are axis names
(`"batch"`, `"height"` ...), fixed dims are integers.

`dtype` is the export's dtype (`float32`, or `float16` for `convert --dtype fp16`); each
component also records `weights_dtype`, the dtype of its weights, because a float16 export
keeps the VAE in float32 unless asked otherwise. The inputs' and outputs' own dtypes say what
the engine feeds and reads (a float16 graph takes and returns float16 tensors, except the
UNet's float32 `timestep` and the int32 `input_ids`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from export.attention import graph_attention
from export.layout import MANIFEST_FILE, ONNX_FILE
from export.onnx_io import EXPORT_METHOD, describe_io, weights_dtype
from export.segments import segment_files

FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def exporter_info(opset: int) -> dict[str, Any]:
    import diffusers
    import onnx
    import torch
    import transformers

    return {
        "name": "tcd-ort-export",
        "opset": opset,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "method": EXPORT_METHOD,
    }


def build_manifest(
    out_dir: pathlib.Path,
    family: str,
    prediction_type: str,
    opset: int,
    lora: list[dict[str, Any]] | None = None,
    fused_lora: list[dict[str, Any]] | None = None,
    lora_slots: dict[str, dict[str, Any]] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """`lora`: LoRAs the engine applies at load time, each `{"source", "weight",
    "weight_name"}`; `fused_lora`: the same for LoRAs already fused into the weights (for the
    record only: the engine must not apply them again); `lora_slots`: per component, the
    empty LoRA layers exported for unfused LoRAs (export.lora_slots.manifest_entry). Written
    only when there are slots, so plain exports keep their manifest unchanged."""
    components = {}
    for name in COMPONENTS:
        path = out_dir / name / ONNX_FILE
        if path.exists():
            components[name] = describe_component(path)
            segments = segment_files(path.parent)
            if segments:
                components[name]["segments"] = segments
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "prediction_type": prediction_type,
        "dtype": dtype,
        "weights_keep_names": True,
        "exporter": exporter_info(opset),
        "components": components,
        "lora": list(lora or []),
        "fused_lora": list(fused_lora or []),
    }
    if lora_slots:
        manifest["lora_slots"] = dict(lora_slots)
    return manifest


def describe_component(path: pathlib.Path) -> dict[str, Any]:
    """`{"weights_dtype", "attention", "inputs", "outputs"}` of one saved graph; `attention` is
    `"fused"` when it has com.microsoft.MultiHeadAttention nodes (export/attention.py)."""
    import onnx

    attention = graph_attention(onnx.load(str(path), load_external_data=False))
    return {"weights_dtype": weights_dtype(path), "attention": attention, **describe_io(path)}


def build_controlnet_manifest(
    out_dir: pathlib.Path, family: str, opset: int, dtype: str = "float32"
) -> dict[str, Any]:
    """The manifest of a flat ControlNet directory (`model.onnx` at its root); `family` is
    `"sd"` or `"sdxl"`."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "controlnet",
        "family": family,
        "dtype": dtype,
        "weights_keep_names": True,
        "exporter": exporter_info(opset),
        "components": {"controlnet": describe_component(out_dir / ONNX_FILE)},
    }


def build_ip_adapter_manifest(
    out_dir: pathlib.Path,
    variant: str,
    family: str,
    cross_attention_dim: int,
    tokens: int,
    layers: list[int],
    image_encoder_output: str,
    opset: int,
) -> dict[str, Any]:
    """The manifest of an IP-Adapter directory (export/ip_adapter.py): `variant` `"plain"` or
    `"plus"`, `tokens` image tokens per image, `layers` the hidden size of each cross-attention
    layer in the UNet's `attn_processors` order, `image_encoder_output` the name of the image
    encoder's output (and the image projection's input)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ip-adapter",
        "variant": variant,
        "family": family,
        "dtype": "float32",
        "weights_keep_names": True,
        "cross_attention_dim": cross_attention_dim,
        "tokens": tokens,
        "layers": list(layers),
        "image_encoder_output": image_encoder_output,
        "exporter": exporter_info(opset),
        "components": {
            name: describe_component(out_dir / name / ONNX_FILE)
            for name in ("image_encoder", "image_projection")
        },
    }


def write_manifest(out_dir: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
    path = out_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
