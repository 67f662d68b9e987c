"""Deterministic random-weight diffusers pipelines for tests, demos and benchmarks.

`build_tiny` makes small pipelines shaped like the ones in diffusers' own test suite
(`tests/pipelines/stable_diffusion*/`), `build_full` makes full-size ones from the real
SD1.5 / SDXL configs in `export/configs/`. Both write a `save_pretrained` directory that
`python -m export convert` and `python -m export reference` read like any real checkpoint.

Tiny families:

- ``sd15``: SD1.5-like, epsilon prediction.
- ``sdxl``: SDXL-like (two text encoders, micro-conditioning), epsilon prediction.
- ``sd21``: SD2.1-base-like, epsilon prediction.
- ``sd21v``: SD2.1-like (768), v-prediction.
- ``sd15-inpaint`` / ``sdxl-inpaint``: ``sd15`` / ``sdxl`` with an inpainting UNet: 9 input
  channels (latents 4 + mask 1 + masked-image latents 4, concatenated in that order), saved as
  a ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` like
  ``stable-diffusion-v1-5/stable-diffusion-inpainting`` and
  ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` (no aesthetic score, zeroed embeddings
  for an empty negative prompt).

The SD2 ones carry the traits that set SD2 apart from SD1 in the real checkpoints: a UNet with
``use_linear_projection`` and a per-block ``attention_head_dim`` (as in diffusers'
``tests/pipelines/stable_diffusion_2`` dummies) and a tokenizer that pads with ``!`` (id 0) like
``stabilityai/stable-diffusion-2-1/tokenizer``. Every tiny text encoder uses ``gelu`` as
diffusers' dummies do (OpenCLIP-H's activation; real SD1.5 uses ``quick_gelu``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

from export.clip_vocab import write_clip_tokenizer

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"

FAMILIES = ("sd15", "sd21", "sd21v", "sdxl", "sd15-inpaint", "sdxl-inpaint")
INPAINT_SUFFIX = "-inpaint"
# Latents, mask and masked-image latents: what diffusers' inpainting pipelines feed a UNet
# whose config says 9 input channels.
INPAINT_IN_CHANNELS = 4 + 1 + 4
# `build_full` needs the real configs in `export/configs/<family>/`.
FULL_FAMILIES = ("sd15", "sdxl")
SD2_FAMILIES = ("sd21", "sd21v")

# The scheduler config diffusers ships with SD1.5 / SDXL, as a TCDScheduler config.
TCD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


def base_family(family: str) -> str:
    """The text-to-image family an inpainting family is built on (``sdxl-inpaint`` -> ``sdxl``)."""
    return family.removesuffix(INPAINT_SUFFIX)


def is_inpaint_family(family: str) -> bool:
    return family.endswith(INPAINT_SUFFIX)


def tiny_scheduler_config(family: str) -> dict[str, Any]:
    """The family's training schedule as a TCDScheduler config.

    SD2.1 (768) predicts v, like `stabilityai/stable-diffusion-2-1/scheduler`; everything else
    about the schedule is the same as SD1.5's and SD2.1-base's.
    """
    if family == "sd21v":
        return {**TCD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    return dict(TCD_SCHEDULER_CONFIG)


def _tiny_unet_config(family: str) -> dict[str, Any]:
    in_channels = INPAINT_IN_CHANNELS if is_inpaint_family(family) else 4
    family = base_family(family)
    common: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    if family == "sd15":
        return {**common, "cross_attention_dim": 32, "attention_head_dim": 8}
    if family in SD2_FAMILIES:
        return {
            **common,
            "cross_attention_dim": 32,
            # SD2's UNet: heads per block ([5, 10, 20, 20] scaled down) and linear projections
            # in and out of every transformer block instead of 1x1 convolutions.
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            # stable-diffusion-2-1 (v) upcasts attention; a no-op in float32, kept for the graph.
            "upcast_attention": family == "sd21v",
        }
    return {
        **common,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        # 6 micro-conditioning ids * addition_time_embed_dim + text_encoder_2 projection_dim
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        # concatenation of both text encoders' hidden widths (32 + 32)
        "cross_attention_dim": 64,
    }


def _tiny_vae_config(family: str) -> dict[str, Any]:
    return {
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "sample_size": 64,
        "scaling_factor": 0.13025 if base_family(family) == "sdxl" else 0.18215,
    }


def _tiny_clip_config(projection: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    }
    if projection:
        cfg["projection_dim"] = 32
    return cfg


def _reinit_zeroed(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give any all-zero weight small random values so parity tests compare real signal."""
    with torch.no_grad():
        for _name, p in module.named_parameters():
            if p.ndim >= 2 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def _tokenizers(out_dir: pathlib.Path, family: str) -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    # SD2's tokenizer pads with "!" (id 0), SD1's with <|endoftext|>; SDXL has one of each.
    names = [("tokenizer", "!" if family in SD2_FAMILIES else "<|endoftext|>")]
    if family == "sdxl":
        names.append(("tokenizer_2", "!"))
    for name, pad in names:
        write_clip_tokenizer(out_dir / name, pad_token=pad)
        # Round-trip so the directory also holds the files diffusers' loaders expect.
        CLIPTokenizer.from_pretrained(out_dir / name)
        CLIPTokenizerFast.from_pretrained(out_dir / name)


def build_tiny(family: str, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a tiny random-weight diffusers pipeline for `family` into `out_dir`."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        TCDScheduler,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    inpaint = is_inpaint_family(family)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tokenizers(out_dir, base_family(family))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    unet = UNet2DConditionModel(**_tiny_unet_config(family))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**_tiny_vae_config(family))
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_clip_config(False)))
    for m in (unet, vae, text_encoder):
        _reinit_zeroed(m, generator)
    scheduler = TCDScheduler(**tiny_scheduler_config(family))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")

    if base_family(family) != "sdxl":
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
        pipe = cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        torch.manual_seed(seed + 4)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_tiny_clip_config(True)))
        _reinit_zeroed(text_encoder_2, generator)
        tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2")
        kwargs: dict[str, Any] = {"force_zeros_for_empty_prompt": True}
        if inpaint:
            # stable-diffusion-xl-1.0-inpainting-0.1 conditions on sizes, not aesthetic scores.
            kwargs["requires_aesthetics_score"] = False
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
        pipe = cls(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            **kwargs,
        )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_config(family: str, component: str) -> dict[str, Any]:
    path = CONFIG_DIR / family / f"{component}.json"
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    drop = {"architectures", "model_type"}
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in drop}


def build_full(family: str, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a full-size random-weight pipeline built from the real configs in `export/configs/`.

    The tokenizers come from `export/clip_vocab.py`, the scheduler is a TCDScheduler with the
    family's training schedule. Weights are random: this is for timing, not for images.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        TCDScheduler,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    if family not in FULL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FULL_FAMILIES)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tokenizers(out_dir, family)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(load_config(family, "unet"))
    vae = AutoencoderKL.from_config(load_config(family, "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder")))
    # Keep only what TCDScheduler knows: the training schedule of the real checkpoint.
    known = set(TCD_SCHEDULER_CONFIG)
    real = {k: v for k, v in load_config(family, "scheduler").items() if k in known}
    sched_cfg = {**TCD_SCHEDULER_CONFIG, **real}
    scheduler = TCDScheduler.from_config(sched_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**load_config(family, "text_encoder_2"))
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2"),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
