"""`python -m export animatediff`: an SD1.x/SD2.x pipeline with an AnimateDiff motion adapter ->
the model directory `convert` writes, whose `unet/` is the motion UNet.

The pipeline is diffusers' own: the base's components and `MotionAdapter.from_pretrained`
make an `AnimateDiffPipeline`, whose constructor builds the UNet with
`UNetMotionModel.from_unet2d(base.unet, adapter)`. LoRAs (a TCD LoRA, AnimateDiff motion LoRAs)
are loaded into that pipeline, so `--lora` / `--fuse-lora` / `--lora-slots` work as in
`convert` (export/convert.py's `export_pipeline` is the shared flow) and motion LoRAs reach the
motion modules. The manifest gets a top-level ``"motion": {"max_frames", "source"}``:
`max_frames` is the adapter's `motion_max_seq_length` (its sinusoidal position table has that
many rows; the graph fails for more frames), `source` the MOTION_ADAPTER argument as given.

The motion UNet's ONNX contract (`export_motion_unet`):

* inputs `sample` f32 [batch, channels, frames, height, width] (AnimateDiff's latent layout),
  `timestep` f32 [batch] and `encoder_hidden_states` f32 [batch, sequence, dim], one row per
  video (batch = videos, doubled by classifier-free guidance). The graph repeats each row over
  the frames itself with `repeat_interleave(frames, dim=0)`, as `AnimateDiffPipeline` does
  before it calls the UNet;
* output `out_sample`, shaped like `sample`;
* `batch`, `frames`, `height` and `width` are dynamic (frames up to `max_frames`);
* no ControlNet residual and no IP-Adapter inputs;
* initializers keep the `UNetMotionModel` parameter names, spatial
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`) and temporal
  (`down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight`) alike, so the
  engine applies TCD and motion LoRAs by name at load time;
* with `--lora-slots` every target module has a slot but the motion modules' proj_in and
  proj_out (`NO_SLOT`);
* with `--attention fused` the temporal attentions (plain `AttnProcessor2_0` over
  [batch * height * width, frames, channels]) are `MultiHeadAttention` nodes like the spatial
  ones.

Refused with a one-line error before anything is written: a MOTION_ADAPTER that is not a
diffusers `MotionAdapter` (directory or hub id), an SDXL base (SDXL motion adapters run in
`AnimateDiffSDXLPipeline`, not supported yet), an inpainting base, a PIA adapter
(`conv_in_channels`), and an adapter whose `block_out_channels` or `motion_layers_per_block`
differ from the base UNet's (an adapter made for another base).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import torch

from export.convert import detect_family, export_pipeline
from export.errors import UserError
from export.lora_slots import inject_slots, slot_param_name, slot_tensor_names
from export.onnx_io import Io, export_component, module_dtype
from export.sources import load_pipeline, looks_like_hub_id

log = logging.getLogger("export")

ADAPTER_CLASS = "MotionAdapter"
# guoyww/animatediff-motion-adapter-sdxl-beta's blocks (SDXL's UNet).
SDXL_BLOCK_OUT_CHANNELS = [320, 640, 1280]
VIDEO_AXES = {0: "batch", 2: "frames", 3: "height", 4: "width"}
# The motion modules' proj_in / proj_out get no LoRA slot: diffusers calls them as
# `proj_in(input=...)`, which peft's LoRA layer (`forward(x)`) cannot take. LoRAs on them are
# fused by the engine like those on any module without a slot.
NO_SLOT = r".*\.motion_modules\.\d+\.proj_(in|out)"


def _per_block(value: Any, blocks: int) -> list[Any]:
    return [value] * blocks if isinstance(value, int) else list(value)


def load_adapter_config(source: str) -> dict[str, Any]:
    """The config of the MotionAdapter at `source` (directory or hub id); UserError when it is
    not one."""
    from diffusers import MotionAdapter

    what = f"motion adapter {source}"
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        raise UserError(
            f"{what}: single-file motion modules are not supported; save it as a diffusers "
            "MotionAdapter directory first (MotionAdapter.from_single_file(...).save_pretrained)"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            kind = "a pipeline directory" if (path / "model_index.json").exists() else "no"
            raise UserError(f"{what}: {kind} config.json; expected a diffusers MotionAdapter dir")
    elif not looks_like_hub_id(source):
        raise UserError(f"{what}: no such directory (and not a hub id like 'owner/name')")
    try:
        config = dict(MotionAdapter.load_config(str(path) if path.is_dir() else source))
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: could not read its config ({type(exc).__name__})") from exc
    name = config.get("_class_name")
    if name != ADAPTER_CLASS:
        raise UserError(f"{what}: a {name or 'model without _class_name'}, not a MotionAdapter")
    return config


def check_adapter_fits(unet: Any, adapter: dict[str, Any], family: str) -> None:
    """UserError unless an SD1.x/SD2.x text-to-image `unet` and the `adapter` config make an
    AnimateDiff UNet (`UNetMotionModel.from_unet2d`'s own checks, and the ones it lacks)."""
    name = type(unet).__name__
    if name != "UNet2DConditionModel":
        raise UserError(f"the base's UNet is a {name}; expected a UNet2DConditionModel")
    cfg = unet.config
    channels = list(adapter.get("block_out_channels") or [])
    if family == "sdxl":
        raise UserError(
            "an SDXL base: SDXL motion adapters (AnimateDiffSDXLPipeline) are not supported yet; "
            "use an SD1.x/SD2.x base with an SD1.5 motion adapter"
        )
    if cfg.in_channels != 4:
        raise UserError(
            f"the base's UNet takes {cfg.in_channels} input channels (an inpainting model); "
            "AnimateDiff needs a text-to-image base"
        )
    if adapter.get("conv_in_channels"):
        raise UserError("PIA motion adapters (conv_in_channels) are not supported")
    base_channels = list(cfg.block_out_channels)
    if channels != base_channels:
        hint = (
            " (an SDXL motion adapter: not supported yet)"
            if channels == SDXL_BLOCK_OUT_CHANNELS
            else ""
        )
        raise UserError(
            f"the motion adapter is for a UNet with block_out_channels {channels}{hint}; the "
            f"base's UNet has {base_channels}"
        )
    blocks = len(base_channels)
    layers = _per_block(cfg.layers_per_block, blocks)
    motion_layers = _per_block(adapter.get("motion_layers_per_block", 2), blocks)
    if layers != motion_layers:
        raise UserError(
            f"the motion adapter has {motion_layers} motion layers per block; the base's UNet "
            f"has {layers} layers per block"
        )


def motion_pipeline(pipe: Any, adapter: Any) -> Any:
    """diffusers' `AnimateDiffPipeline` from a text-to-image pipeline's components and a
    `MotionAdapter` (its constructor makes the UNet with `UNetMotionModel.from_unet2d`)."""
    from diffusers import AnimateDiffPipeline

    return AnimateDiffPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        motion_adapter=adapter,
        scheduler=pipe.scheduler,
    )


def load_animatediff(base: str, motion_adapter: str, config: str | None = None) -> Any:
    """The `AnimateDiffPipeline` of `base` (pipeline dir, single file or hub id) and the
    MotionAdapter `motion_adapter`, float32 on CPU, after the checks of `check_adapter_fits`."""
    from diffusers import MotionAdapter

    adapter_config = load_adapter_config(motion_adapter)
    pipe = load_pipeline(base, config)
    check_adapter_fits(pipe.unet, adapter_config, detect_family(pipe))
    path = pathlib.Path(motion_adapter).expanduser()
    adapter = MotionAdapter.from_pretrained(
        str(path) if path.is_dir() else motion_adapter, torch_dtype=torch.float32
    )
    return motion_pipeline(pipe, adapter.eval())


def _repeat_interleave_onnx(self, repeats, dim=None, output_size=None):  # noqa: ANN001, ANN201
    """`aten::repeat_interleave.self_int` for symbolic `repeats` too. onnxscript 0.7.2's own
    translation expands the wrong axis when `repeats` is symbolic (the frame count here): a
    batch of 2 fails with "invalid expand shape", a batch of 1 gives the repeats in the
    wrong order. Unsqueeze after `dim`, expand that axis to `repeats`, merge the two."""
    from onnxscript import opset18 as op

    if dim is None:
        self = op.Reshape(self, op.Constant(value_ints=[-1]))
        dim = 0
    rank = len(self.shape)
    dim = (dim + rank) % rank
    if isinstance(repeats, int):
        count = op.Constant(value_ints=[repeats])
    else:
        count = op.Reshape(repeats, op.Constant(value_ints=[-1]))
    expanded = op.Expand(
        op.Unsqueeze(self, op.Constant(value_ints=[dim + 1])),
        op.Concat(
            op.Shape(self, start=0, end=dim + 1), count, op.Shape(self, start=dim + 1), axis=0
        ),
    )
    shape = op.Concat(
        op.Shape(self, start=0, end=dim),
        op.Constant(value_ints=[-1]),
        op.Shape(self, start=dim + 1),
        axis=0,
    )
    return op.Reshape(expanded, shape)


MOTION_TRANSLATIONS = {torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_onnx}


class MotionUNet(torch.nn.Module):
    """A `UNetMotionModel` taking one text-embedding row per video, as the exported graph does:
    the rows are repeated over the frames as `AnimateDiffPipeline` repeats them."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        frames = sample.shape[2]
        states = encoder_hidden_states.repeat_interleave(frames, dim=0)
        return self.unet(sample, timestep, states, return_dict=False)[0]


def export_motion_unet(
    unet: torch.nn.Module,
    out_dir: pathlib.Path,
    opset: int,
    pooled_dim: int | None = None,
    lora_slots: int | None = None,
    attention: str = "fused",
) -> list[str]:
    """Export a `UNetMotionModel` to `out_dir` (the contract in the module docs); returns the
    modules given LoRA slots (injected into `unet` itself, as `export_unet` does).
    `pooled_dim` is `export_pipeline`'s UNet-exporter argument, unused (no SDXL)."""
    del pooled_dim
    cfg = unet.config
    slotted: list[str] = []
    rename = None
    if lora_slots is not None:
        slotted = inject_slots(unet, lora_slots, exclude=NO_SLOT)
        rename = slot_param_name
    dtype = module_dtype(unet)
    # Odd example sizes keep the exporter from tying unrelated dims together (see export_unet);
    # 7 frames is within every adapter's motion_max_seq_length.
    batch, frames, h, w = 2, 7, 23, 40
    args = (
        torch.randn(batch, cfg.in_channels, frames, h, w, dtype=dtype),
        torch.full((batch,), 999.0),
        torch.randn(batch, 77, cfg.cross_attention_dim, dtype=dtype),
    )
    inputs = [
        Io("sample", VIDEO_AXES),
        Io("timestep", {0: "batch"}),
        Io("encoder_hidden_states", {0: "batch", 1: "sequence"}),
    ]
    export_component(
        MotionUNet(unet),
        args,
        inputs,
        [Io("out_sample", VIDEO_AXES)],
        out_dir,
        opset,
        prefix="unet.",
        rename=rename,
        attention=attention,
        overridable=slot_tensor_names(slotted),
        translations=MOTION_TRANSLATIONS,
    )
    unet.save_config(out_dir)
    return slotted


def animatediff(
    base: str,
    motion_adapter: str,
    out_dir: pathlib.Path,
    config: str | None = None,
    opset: int = 18,
    overwrite: bool = False,
    loras: list[Any] | None = None,
    fuse_lora: bool = False,
    lora_slots: int | None = None,
    attention: str = "fused",
) -> dict[str, Any]:
    """Export `base` with the motion adapter `motion_adapter` into `out_dir` (float32); returns
    the manifest written. The options are `convert`'s (export/convert.py)."""
    adapter_config = load_adapter_config(motion_adapter)
    max_frames = int(adapter_config.get("motion_max_seq_length", 32))
    motion = {"max_frames": max_frames, "source": motion_adapter}
    log.info("motion adapter %s: %s", motion_adapter, json.dumps(motion))
    return export_pipeline(
        base,
        out_dir,
        lambda: load_animatediff(base, motion_adapter, config),
        opset=opset,
        overwrite=overwrite,
        loras=loras,
        fuse_lora=fuse_lora,
        lora_slots=lora_slots,
        attention=attention,
        unet_exporter=export_motion_unet,
        manifest_extra={"motion": motion},
    )
