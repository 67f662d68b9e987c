"""LoRA slots: `convert --lora-slots RANK` exports the UNet with empty peft LoRA layers.

The engine can apply LoRAs without fusing them (diffusers' default: peft's unfused
``y = W x + scale * B (A x)``) when the exported graph already computes that sum. This module
injects a peft LoRA layer of rank RANK on every target module of the UNet and sets A = 0 and
B = 0, so the export computes exactly the base model. At load time the engine replaces the
slot initializers by name with the requested LoRAs, concatenated along the rank::

    A_slot = concat_k(A_k), zero rows up to RANK
    B_slot = concat_k(w_k * alpha_k / r_k * B_k), zero columns up to RANK

The slot tensors are *overridable initializers*: each is an initializer (external data, value
zero) and also a graph input of the same name, element type and shape (ONNX IR >= 4). ONNX
Runtime keeps the stored zeros as the input's default, never constant-folds them, and lists
them under `get_overridable_initializers()`, not `get_inputs()`; so the engine either replaces
them by name when it creates the session (`add_external_initializers`) or feeds them at every
`run`, which swaps LoRAs in an already loaded UNet session. A slot not fed computes the base
model. ONNX Runtime logs a one-line warning per such initializer when it loads the graph. The
base weights stay plain initializers, and the manifest's component `inputs` list only the real
inputs. The UNet's low-memory segments (export/segments.py) do the same: each segment declares
the slot tensors it reads as inputs too.

Names in the exported graph (all external data, so ONNX Runtime honours replacements at full
optimisation):

* ``<module>.weight`` / ``<module>.bias``: the base layer, under the same name as in a plain
  export (peft's ``.base_layer.`` is removed), so fusing still works for every module;
* ``<module>.lora_A.weight``: A, ``(RANK, in)`` for linear layers, ``(RANK, in, kh, kw)`` for
  convolutions (peft's ``lora_A.<adapter>.`` without the adapter name);
* ``<module>.lora_B.weight``: B, ``(out, RANK)`` or ``(out, RANK, 1, 1)``.

The graph multiplies by peft's scale ``lora_alpha / r``, exported as 1 (``lora_alpha = r``): the
engine folds every adapter's own scale and weight into its columns of B.

The manifest (`tcd_ort.json`) records the slots under ``lora_slots``::

    "lora_slots": {"unet": {"rank": 64, "lora_alpha": 64, "target_modules": [...],
                            "modules": ["down_blocks.0.resnets.0.conv1", ...],
                            "lora_a": "{module}.lora_A.weight",
                            "lora_b": "{module}.lora_B.weight",
                            "overridable": true}}

``overridable: true`` says the slot tensors are graph inputs that can be fed at run time (see
above); a manifest without it (exports before that) has slots only replaceable at session
creation.

The target modules are the ``lora_target_modules`` default of diffusers' consistency-distillation
LoRA training scripts (``examples/consistency_distillation/train_lcm_distill_lora_sd(xl)*.py``),
which TCD's training inherits, so the TCD-SD15/SDXL LoRAs fit the slots entirely. Text encoders
get no slots: their LoRAs are small enough to fuse at load time.
"""

from __future__ import annotations

import re
from typing import Any

from export.errors import UserError

# peft target names, matched as `name == t or name.endswith("." + t)`.
TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)

# peft's adapter name for the slots; it never reaches the exported names.
ADAPTER = "tcd_ort_slot"
LORA_A = "{module}.lora_A.weight"
LORA_B = "{module}.lora_B.weight"

_PEFT_NAME = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.")


def check_rank(rank: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"--lora-slots {rank}: the slot rank must be a positive integer")


def inject_slots(module: Any, rank: int, exclude: str | None = None) -> list[str]:
    """Add an empty (A = B = 0) peft LoRA layer of `rank` on every target module of `module`
    (a diffusers model with `add_adapter`) but those whose name fully matches the regular
    expression `exclude`; returns the slotted module names, sorted."""
    import torch
    from peft import LoraConfig

    check_rank(rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(TARGET_MODULES),
        init_lora_weights=False,
        lora_dropout=0.0,
        exclude_modules=exclude,
    )
    module.add_adapter(config, adapter_name=ADAPTER)
    slotted = []
    with torch.no_grad():
        for name, sub in module.named_modules():
            lora_a = getattr(sub, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER in lora_a:
                lora_a[ADAPTER].weight.zero_()
                sub.lora_B[ADAPTER].weight.zero_()
                slotted.append(name)
    return sorted(slotted)


def slot_param_name(name: str) -> str:
    """peft's parameter name -> the exported initializer name (see the module docs)."""
    name = name.replace(".base_layer.", ".")
    return _PEFT_NAME.sub(r".\1.", name)


def slot_tensor_names(modules: list[str]) -> list[str]:
    """The exported names of the slot tensors of `modules` (A then B, per module)."""
    return [n for m in modules for n in (LORA_A.format(module=m), LORA_B.format(module=m))]


def manifest_entry(rank: int, modules: list[str]) -> dict[str, Any]:
    return {
        "rank": rank,
        "lora_alpha": rank,
        "target_modules": list(TARGET_MODULES),
        "modules": list(modules),
        "lora_a": LORA_A,
        "lora_b": LORA_B,
        "overridable": True,
    }
