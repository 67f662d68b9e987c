"""The denoising UNet: `unet/`.

Inputs `sample` f32 [batch, channels, height, width], `timestep` f32 [batch] and
`encoder_hidden_states` f32 [batch, sequence, cross_attention_dim]; SDXL adds `text_embeds`
f32 [batch, pooled_dim] and `time_ids` f32 [batch, 6] (diffusers' `added_cond_kwargs`).
Output `out_sample`, shaped like `sample`.

With `lora_slots=RANK` the UNet is exported with empty peft LoRA layers (see
export/lora_slots.py) and `export_unet` returns the slotted module names.
"""

from __future__ import annotations

import pathlib

import torch

from export.lora_slots import inject_slots, slot_param_name
from export.onnx_io import Io, export_component


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    return unet.config.addition_embed_type == "text_time"


def export_unet(
    unet: torch.nn.Module,
    out_dir: pathlib.Path,
    opset: int,
    pooled_dim: int | None = None,
    lora_slots: int | None = None,
) -> list[str]:
    """Export `unet` to `out_dir`; returns the modules given LoRA slots (none without
    `lora_slots`). Slots are injected into `unet` itself: pass a copy to keep the original."""
    cfg = unet.config
    slotted: list[str] = []
    rename = None
    if lora_slots is not None:
        slotted = inject_slots(unet, lora_slots)
        rename = slot_param_name
    # Odd-looking example sizes keep the exporter from tying unrelated dims together.
    batch, h, w = 2, 24, 40
    args: tuple[torch.Tensor, ...] = (
        torch.randn(batch, cfg.in_channels, h, w),
        torch.full((batch,), 999.0),
        torch.randn(batch, 77, cfg.cross_attention_dim),
    )
    image_axes = {0: "batch", 2: "height", 3: "width"}
    inputs = [
        Io("sample", image_axes),
        Io("timestep", {0: "batch"}),
        Io("encoder_hidden_states", {0: "batch", 1: "sequence"}),
    ]
    if is_sdxl_unet(unet):
        if pooled_dim is None:
            time_dim = cfg.addition_time_embed_dim
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * time_dim
        args = args + (torch.randn(batch, pooled_dim), torch.tensor([[64.0, 80.0, 0, 0, 64, 80]] * batch))
        inputs += [Io("text_embeds", {0: "batch"}), Io("time_ids", {0: "batch"})]
    export_component(
        _UNet(unet),
        args,
        inputs,
        [Io("out_sample", image_axes)],
        out_dir,
        opset,
        prefix="unet.",
        rename=rename,
    )
    unet.save_config(out_dir)
    return slotted
