"""`python -m export tiny-motion-adapter`: random-weight AnimateDiff `MotionAdapter`s for tiny test
pipelines, saved with `save_pretrained` (config.json + diffusion_pytorch_model.safetensors), the
layout `MotionAdapter.from_pretrained` and `python -m export animatediff` read."""

from __future__ import annotations

import pathlib

import torch

from export.errors import UserError

# diffusers' own AnimateDiff pipeline tests (tests/pipelines/animatediff/test_animatediff.py)
# build their adapter with these.
TINY_MOTION_NORM_GROUPS = 2
TINY_MOTION_HEADS = 4


def _randomise(adapter: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded values at a trained module's scale for every parameter: weights N(0, 1/fan_in),
    norm gains near 1, small biases. diffusers zero-initialises each motion module's
    `proj_out`, which makes the module an identity; here every temporal attention moves the
    output."""
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def build_tiny_motion_adapter(
    pipeline_dir: pathlib.Path, out_dir: pathlib.Path, seed: int = 0, max_frames: int = 32
) -> pathlib.Path:
    """A random-weight `MotionAdapter` for the pipeline in `pipeline_dir` (its unet/ config):
    the UNet's `block_out_channels` and `layers_per_block` (as `motion_layers_per_block`), 4
    heads, norm groups of 2, a motion mid block, `motion_max_seq_length = max_frames`. Different
    seeds give different adapters."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    pipeline_dir = pathlib.Path(pipeline_dir)
    if not (pipeline_dir / "unet" / "config.json").exists():
        raise UserError(
            f"{pipeline_dir}: not a diffusers pipeline directory with a unet/ "
            "(make one with `python -m export tiny --family sd15 DIR`)"
        )
    if max_frames < 1:
        raise UserError(f"--max-frames {max_frames}: must be at least 1")
    config = UNet2DConditionModel.load_config(pipeline_dir / "unet")
    channels = list(config["block_out_channels"])
    bad = [c for c in channels if c % TINY_MOTION_HEADS or c % TINY_MOTION_NORM_GROUPS]
    if bad:
        raise UserError(
            f"{pipeline_dir}: block_out_channels {channels} must be multiples of "
            f"{TINY_MOTION_HEADS} (motion heads)"
        )
    adapter = MotionAdapter(
        block_out_channels=tuple(channels),
        motion_layers_per_block=config["layers_per_block"],
        motion_norm_num_groups=TINY_MOTION_NORM_GROUPS,
        motion_num_attention_heads=TINY_MOTION_HEADS,
        motion_max_seq_length=max_frames,
    )
    _randomise(adapter, torch.Generator().manual_seed(seed))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.save_pretrained(out_dir)
    return out_dir
