"""`python -m export controlnet`: a diffusers `ControlNetModel` -> a flat ONNX directory.

Layout written::

    OUT_DIR/model.onnx  model.onnx_data  config.json  tcd_ort.json

`config.json` is the ControlNetModel config (`save_config`), `tcd_ort.json` the manifest:
`{"format_version": 1, "kind": "controlnet", "family": "sd" | "sdxl", "dtype": "float32",
"weights_keep_names": true, "exporter": {...}, "components": {"controlnet": {inputs,
outputs}}}`. The family is `sdxl` for a ControlNet with SDXL's micro-conditioning
(`addition_embed_type == "text_time"`), `sd` otherwise (SD1.x and SD2.x ControlNets have the
same inputs; which UNet one fits is its `cross_attention_dim` and channel widths, in config.json).

Graph inputs: `sample` f32 [batch, 4, height, width] (the latents, scaled by the scheduler as
the UNet's input), `timestep` f32 [batch], `encoder_hidden_states` f32 [batch, sequence, dim],
`controlnet_cond` f32 [batch, 3, image_height, image_width] (the control image in [0, 1], RGB,
at the output image's size: image_height = height x the VAE scale factor, 8 for real
checkpoints; the conditioning embedding downsamples by 2^(len(conditioning_embedding_out_channels)
- 1)), and for SDXL `text_embeds` f32 [batch, pooled] and `time_ids` f32 [batch, 6].

Outputs: `down_block_res_sample_0` ... `down_block_res_sample_{N-1}` and `mid_block_res_sample`,
f32 [batch, C_i, height_k, width_k] with height_k = ceil(height / 2^k), exactly the UNet's
`down_block_additional_residual_*` / `mid_block_additional_residual` inputs (see unet.py). They
are exported with `conditioning_scale=1.0` and `guess_mode=False`: the engine multiplies them
by the scale itself, as `ControlNetModel.forward` does (`sample * conditioning_scale`), and
sums several ControlNets' outputs as `MultiControlNetModel` does.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any

import onnx
import torch

from export.convert import DTYPE_NAMES, torch_dtype
from export.errors import UserError
from export.manifest import build_controlnet_manifest, write_manifest
from export.onnx_io import Io, export_component, module_dtype
from export.sources import load_model
from export.unet import controlnet_residual_shapes

log = logging.getLogger("export")

DOWN_OUTPUT = "down_block_res_sample_{}"
MID_OUTPUT = "mid_block_res_sample"
CONTROLNET_CLASS = "ControlNetModel"
# What ControlNetModel.from_unet zero-initialises (the "zero convolutions").
ZEROED_BY_FROM_UNET = (
    "controlnet_cond_embedding.conv_out.",
    "controlnet_down_blocks.",
    "controlnet_mid_block.",
)


class _ControlNet(torch.nn.Module):
    def __init__(self, controlnet: torch.nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *extra: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        added = None
        if self.sdxl:
            added = {"text_embeds": extra[0], "time_ids": extra[1]}
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return (*down, mid)


def is_sdxl_controlnet(controlnet: torch.nn.Module) -> bool:
    return controlnet.config.addition_embed_type == "text_time"


def controlnet_family(controlnet: torch.nn.Module) -> str:
    return "sdxl" if is_sdxl_controlnet(controlnet) else "sd"


def cond_scale_factor(config: Any) -> int:
    """How much larger the control image is than the latents: the conditioning embedding's
    stride-2 convolutions, one between each pair of `conditioning_embedding_out_channels`."""
    return 2 ** (len(config.conditioning_embedding_out_channels) - 1)


def load_controlnet(source: str) -> Any:
    """A `ControlNetModel` from a local directory (its own, or a ControlNet pipeline's with a
    `controlnet/` folder) or a hub id, in float32 on CPU."""
    from diffusers import ControlNetModel

    return load_model(source, ControlNetModel, "controlnet", "lllyasviel/sd-controlnet-canny")


def export_controlnet_model(
    controlnet: torch.nn.Module, out_dir: pathlib.Path, opset: int, attention: str = "fused"
) -> onnx.ModelProto:
    """Export `controlnet` to `out_dir/model.onnx` (+ `model.onnx_data`) and its config.json."""
    cfg = controlnet.config
    sdxl = is_sdxl_controlnet(controlnet)
    factor = cond_scale_factor(cfg)
    dtype = module_dtype(controlnet)
    # As in unet.py: an odd latent height makes every ceil(n / 2) differ from n // 2.
    batch, h, w = 2, 23, 40
    args: tuple[torch.Tensor, ...] = (
        torch.randn(batch, cfg.in_channels, h, w, dtype=dtype),
        torch.full((batch,), 999.0),
        torch.randn(batch, 77, cfg.cross_attention_dim, dtype=dtype),
        torch.rand(batch, cfg.conditioning_channels, h * factor, w * factor, dtype=dtype),
    )
    inputs = [
        Io("sample", {0: "batch", 2: "height", 3: "width"}),
        Io("timestep", {0: "batch"}),
        Io("encoder_hidden_states", {0: "batch", 1: "sequence"}),
        Io("controlnet_cond", {0: "batch", 2: "image_height", 3: "image_width"}),
    ]
    if sdxl:
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        args = args + (
            torch.randn(batch, pooled_dim, dtype=dtype),
            torch.tensor([[64.0, 80.0, 0, 0, 64, 80]] * batch, dtype=dtype),
        )
        inputs += [Io("text_embeds", {0: "batch"}), Io("time_ids", {0: "batch"})]
    down, mid = controlnet_residual_shapes(cfg)
    outputs = [Io(DOWN_OUTPUT.format(i), r.axes()) for i, r in enumerate(down)]
    outputs.append(Io(MID_OUTPUT, mid.axes()))
    model = export_component(
        _ControlNet(controlnet, sdxl),
        args,
        inputs,
        outputs,
        out_dir,
        opset,
        prefix="controlnet.",
        attention=attention,
    )
    controlnet.save_config(out_dir)
    return model


def export_controlnet(
    source: str,
    out_dir: pathlib.Path,
    opset: int = 18,
    overwrite: bool = False,
    dtype: str = "fp32",
    attention: str = "fused",
) -> dict[str, Any]:
    """Export the ControlNet `source` into the flat directory `out_dir`; returns the manifest.

    `dtype="fp16"` exports float16 weights and float16 float inputs/outputs (`timestep` stays
    float32), to pair with a `convert --dtype fp16` UNet."""
    model_dtype = torch_dtype(dtype)
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    controlnet = load_controlnet(source).eval().to(model_dtype)
    family = controlnet_family(controlnet)
    log.info("loaded %s (%s ControlNet) in %.1fs", source, family, time.perf_counter() - t0)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    export_controlnet_model(controlnet, out_dir, opset, attention)
    manifest = build_controlnet_manifest(out_dir, family, opset, DTYPE_NAMES[dtype])
    write_manifest(out_dir, manifest)
    log.info("wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return manifest


def build_tiny_controlnet(
    pipeline_dir: pathlib.Path, out_dir: pathlib.Path, seed: int = 0
) -> pathlib.Path:
    """`ControlNetModel.from_unet` of a tiny pipeline's UNet, with random weights where
    from_unet leaves zeros, saved with `save_pretrained`.

    from_unet copies the UNet's encoder and zero-initialises the conditioning embedding's last
    convolution and the `controlnet_down_blocks` / `controlnet_mid_block` 1x1 convolutions (the
    trained ControlNet starts as a no-op). Here they get seeded random values instead, so the
    residuals are far from zero and move the UNet's output; different seeds give different
    ControlNets. The conditioning embedding downsamples by the pipeline's VAE scale factor, so
    the control image has the output image's size, as with real checkpoints.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    pipeline_dir = pathlib.Path(pipeline_dir)
    if not (pipeline_dir / "unet" / "config.json").exists():
        raise UserError(
            f"{pipeline_dir}: not a diffusers pipeline directory with a unet/ "
            "(make one with `python -m export tiny --family sd15 DIR`)"
        )
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet", torch_dtype=torch.float32)
    if unet.config.in_channels != 4:
        raise UserError(
            f"{pipeline_dir}: its UNet takes {unet.config.in_channels} input channels; "
            "ControlNets are made for 4-channel (text-to-image) UNets"
        )
    vae_cfg = AutoencoderKL.load_config(pipeline_dir / "vae")
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    # diffusers' default (16, 32, 96, 256) downsamples by 8; keep its widths, one per factor 2.
    widths = (16, 32, 96, 256)
    n = vae_scale.bit_length()
    if 2 ** (n - 1) != vae_scale or n > len(widths):
        raise UserError(f"{pipeline_dir}: unsupported VAE scale factor {vae_scale}")
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths[:n])
    generator = torch.Generator().manual_seed(seed + 1)
    zeroed = ZEROED_BY_FROM_UNET
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(zeroed):
                # Weights about as large as a default conv init; biases small.
                scale = 0.2 if p.ndim > 1 else 0.05
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
