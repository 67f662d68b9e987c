"""`python -m export tiny-ip-adapter`: random-weight IP-Adapters for tiny test pipelines, laid
out as h94/IP-Adapter is and with its original key names, so `python -m export ip-adapter`
and diffusers' `load_ip_adapter` read them through their real conversion paths."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import torch

from export.errors import UserError
from export.ip_adapter import DEFAULT_IMAGE_ENCODER_FOLDER, PLUS_DEPTH, PLUS_DIM_HEAD, VARIANTS

# The tiny adapters: the weight names (h94 names theirs `ip-adapter_<base>.safetensors` and
# `ip-adapter-plus_<base>.safetensors`), the CLIP vision encoder (diffusers' IP-Adapter pipeline
# tests' sizes, 8x8 patches of 4 pixels) and the plus Resampler.
TINY_SUBFOLDER = "models"
TINY_WEIGHT_NAMES = {"plain": "ip-adapter.safetensors", "plus": "ip-adapter-plus.safetensors"}
TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    # OpenCLIP ViT-H / bigG's activation (the encoders h94 ships).
    "hidden_act": "gelu",
}
TINY_PLUS_HIDDEN = 32
TINY_PLUS_HEADS = 2
TINY_PLUS_TOKENS = 16


def attn2_hidden_sizes(unet_config: Any, processor_names: list[str]) -> list[int]:
    """The hidden size of each cross-attention processor, in order, as diffusers'
    `_convert_ip_adapter_attn_to_diffusers` computes it from `block_out_channels`."""
    channels = list(unet_config["block_out_channels"])
    sizes = []
    for name in processor_names:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            sizes.append(channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        elif name.startswith("down_blocks"):
            sizes.append(channels[int(name[len("down_blocks.")])])
        else:
            raise ValueError(f"attention processor {name!r} outside the UNet's blocks")
    return sizes


def _random_like(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded values at the scale of a trained adapter: weights N(0, 1/fan_in), LayerNorm
    gains near 1, small biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("latents"):
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif "norm" in name or ".ln" in name or ".ff.0." in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _plus_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An `IPAdapterPlusImageProjection` state dict in the original Resampler's key layout
    (h94's `image_proj.*`), the inverse of diffusers' converter: `layers.i.ln0/ln1` ->
    `layers.i.0.norm1/norm2`, `layers.i.attn.to_q` -> `layers.i.0.to_q`, `to_k` and `to_v`
    stacked as `layers.i.0.to_kv`, `to_out.0` -> `to_out`, `layers.i.ff.0` / `ff.1.net.0.proj`
    / `ff.1.net.2` -> `layers.i.1.0` / `1.1` / `1.3`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if m is None:
            out[key] = value
            continue
        i, rest = m.group(1), m.group(2)
        renames = {
            "ln0.": "0.norm1.",
            "ln1.": "0.norm2.",
            "attn.to_q.": "0.to_q.",
            "attn.to_out.0.": "0.to_out.",
            "ff.0.": "1.0.",
            "ff.1.net.0.proj.": "1.1.",
            "ff.1.net.2.": "1.3.",
        }
        if rest.startswith("attn.to_k."):
            v = state[f"layers.{i}.attn.to_v.{rest.removeprefix('attn.to_k.')}"]
            out[f"layers.{i}.0.to_kv.{rest.removeprefix('attn.to_k.')}"] = torch.cat([value, v])
            continue
        if rest.startswith("attn.to_v."):
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                out[f"layers.{i}.{new}{rest.removeprefix(old)}"] = value
                break
        else:
            raise ValueError(f"unexpected Resampler parameter {key}")
    return out


def build_tiny_ip_adapter(
    pipeline_dir: pathlib.Path, out_dir: pathlib.Path, variant: str = "plain", seed: int = 0
) -> pathlib.Path:
    """A random-weight IP-Adapter for the pipeline in `pipeline_dir`, laid out like
    h94/IP-Adapter: `models/<TINY_WEIGHT_NAMES[variant]>` in the original key layout and a
    tiny `CLIPVisionModelWithProjection` in `models/image_encoder/` (no preprocessor config,
    as h94 ships none).

    Sized for the pipeline's UNet: tokens as wide as its `cross_attention_dim`, one
    `to_k_ip` / `to_v_ip` pair per attn2 layer (`ip_adapter.1`, `.3`, ...) with the hidden
    size diffusers gives it. Plain: `ImageProjection` from the encoder's 32-wide
    `image_embeds` to 4 tokens. Plus: a 4-layer Resampler (hidden 32, 2 heads of 64, as the
    converter reads heads off `to_q`) from the encoder's penultimate hidden states to 16
    tokens. Weights are seeded random values of a trained adapter's scale, so the adapter moves
    the UNet's output; different seeds give different adapters.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    pipeline_dir = pathlib.Path(pipeline_dir)
    if not (pipeline_dir / "unet" / "config.json").exists():
        raise UserError(
            f"{pipeline_dir}: not a diffusers pipeline directory with a unet/ "
            "(make one with `python -m export tiny --family sd15 DIR`)"
        )
    unet_config = UNet2DConditionModel.load_config(pipeline_dir / "unet")
    # Only the processor names are needed: build the UNet without memory for its weights.
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(unet_config).attn_processors)
    hidden_sizes = attn2_hidden_sizes(unet_config, names)
    cross_attention_dim = unet_config["cross_attention_dim"]
    if not isinstance(cross_attention_dim, int):
        raise UserError(f"{pipeline_dir}: per-block cross_attention_dim is not supported")

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION_CONFIG)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    # CLIP's initializer_range (0.02) leaves every image's embedding nearly the same; spread
    # the weights so different images give different tokens.
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    vision = encoder.config
    if variant == "plain":
        projection: torch.nn.Module = ImageProjection(
            image_embed_dim=vision.projection_dim,
            cross_attention_dim=cross_attention_dim,
            num_image_text_embeds=4,
        )
        _random_like(projection, generator)
        state = projection.state_dict()
        image_proj = {
            "proj.weight": state["image_embeds.weight"],
            "proj.bias": state["image_embeds.bias"],
            "norm.weight": state["norm.weight"],
            "norm.bias": state["norm.bias"],
        }
    else:
        projection = IPAdapterPlusImageProjection(
            embed_dims=vision.hidden_size,
            output_dims=cross_attention_dim,
            hidden_dims=TINY_PLUS_HIDDEN,
            depth=PLUS_DEPTH,
            dim_head=PLUS_DIM_HEAD,
            heads=TINY_PLUS_HEADS,
            num_queries=TINY_PLUS_TOKENS,
        )
        _random_like(projection, generator)
        image_proj = _plus_to_original(projection.state_dict())
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
    for i, hidden in enumerate(hidden_sizes):
        for kind in ("k", "v"):
            w = torch.randn(hidden, cross_attention_dim, generator=generator)
            tensors[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = w / cross_attention_dim**0.5
    models = pathlib.Path(out_dir) / TINY_SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(models / TINY_WEIGHT_NAMES[variant]))
    encoder.save_pretrained(models / DEFAULT_IMAGE_ENCODER_FOLDER)
    return pathlib.Path(out_dir)
