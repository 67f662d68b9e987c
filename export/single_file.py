"""A diffusers pipeline directory -> an original-layout single-file `.safetensors` checkpoint.

The inverse of what diffusers' `from_single_file` reads, written out so the `convert` path for
A1111 / ComfyUI checkpoints can be tested without downloading one: tests build a tiny pipeline,
write it in the original layout here, convert both and compare.

Original (CompVis / SGM) layout::

    model.diffusion_model.*                      UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                          VAE (encoder.down.N.block.M, 1x1-conv attention)
    cond_stage_model.transformer.text_model.*    SD1.x CLIP ViT-L, HF names
    conditioner.embedders.0.transformer.text_model.*   SDXL CLIP ViT-L, HF names
    conditioner.embedders.1.model.*              SDXL OpenCLIP ViT-bigG (resblocks, fused in_proj)

Every key is mapped explicitly: a key this module does not know raises instead of being dropped,
so a round trip that loses weights fails loudly.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

Tensors = dict[str, torch.Tensor]

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}


class UnmappedKey(KeyError):
    """A diffusers key with no original-layout counterpart in this module."""


def _rename(rest: str, table: dict[str, str], key: str) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise UnmappedKey(key)


def unet_to_original(state: Tensors, config: dict[str, Any]) -> Tensors:
    """UNet2DConditionModel weights -> `model.diffusion_model.*` keys (prefix not included)."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block {lpb!r}: only one value for every block is supported")
    out: Tensors = {}
    for key, value in state.items():
        for old, new in _UNET_TOP.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            out[_unet_block_key(key, lpb, config)] = value
    return out


def _unet_block_key(key: str, lpb: int, config: dict[str, Any]) -> str:
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{n}.0.{_rename(rest, _UNET_RESNET, key)}"
        return f"input_blocks.{n}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename(rest, _UNET_RESNET, key)}"
        return f"middle_block.{2 * j + 1}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{n}.0.{_rename(rest, _UNET_RESNET, key)}"
        return f"output_blocks.{n}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        # The upsampler follows the resnet, and the transformer when the block has one.
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    raise UnmappedKey(key)


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_to_original(state: Tensors, config: dict[str, Any]) -> Tensors:
    """AutoencoderKL weights -> `first_stage_model.*` keys (prefix not included)."""
    n_up = len(config["up_block_types"])
    out: Tensors = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = value
            continue
        part, _, rest = key.partition(".")
        if part not in ("encoder", "decoder"):
            raise UnmappedKey(key)
        m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            tail = m[4].replace("conv_shortcut.", "nin_shortcut.")
            out[f"{part}.{m[1]}.{i}.block.{m[3]}.{tail}"] = value
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.*)", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            out[f"{part}.{m[1]}.{i}.{m[3]}sample.conv.{m[4]}"] = value
            continue
        m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
        if m:
            tail = m[2].replace("conv_shortcut.", "nin_shortcut.")
            out[f"{part}.mid.block_{int(m[1]) + 1}.{tail}"] = value
            continue
        m = re.match(r"mid_block\.attentions\.0\.(.*)", rest)
        if m:
            new = f"{part}.mid.attn_1.{_rename(m[1], _VAE_ATTENTION, key)}"
            # The original attention projections are 1x1 convolutions.
            if value.ndim == 2:
                value = value[:, :, None, None]
            out[new] = value
            continue
        if rest.startswith("conv_norm_out."):
            out[f"{part}.norm_out.{rest[len('conv_norm_out.') :]}"] = value
        elif rest.startswith(("conv_in.", "conv_out.")):
            out[key] = value
        else:
            raise UnmappedKey(key)
    return out


def clip_to_original(state: Tensors) -> Tensors:
    """CLIPTextModel weights -> `...transformer.*` keys: HF names under `text_model.`.

    transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; original
    checkpoints always have it (and the `position_ids` buffer, kept here as they carry it).
    """
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    n = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_to_original(state: Tensors) -> Tensors:
    """CLIPTextModelWithProjection weights -> OpenCLIP `model.*` keys (prefix not included).

    q/k/v projections are fused into `attn.in_proj_*` (rows q, then k, then v) as
    torch.nn.MultiheadAttention stores them; `text_projection` is stored transposed, applied as
    `x @ text_projection`.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: Tensors = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key[len("final_layer_norm.") :]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        else:
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
            if not m:
                raise UnmappedKey(key)
            layer, rest = m[1], m[2]
            p = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if p:
                qkv.setdefault((layer, p[2]), {})[p[1]] = value
            else:
                out[f"transformer.resblocks.{layer}.{_rename(rest, _OPEN_CLIP_LAYER, key)}"] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise UnmappedKey(f"encoder.layers.{layer}.self_attn: q/k/v {kind} incomplete")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


def _load_component(pipe_dir: pathlib.Path, name: str) -> tuple[Tensors, dict[str, Any]]:
    from safetensors.torch import load_file

    d = pipe_dir / name
    files = sorted(d.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{d}: expected one .safetensors file, found {len(files)}")
    return load_file(str(files[0])), json.loads((d / "config.json").read_text())


def _prefixed(prefix: str, state: Tensors) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def pipeline_to_single_file(pipe_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Write the UNet, VAE and text encoder(s) of the diffusers directory `pipe_dir` to `out`."""
    from safetensors.torch import save_file

    pipe_dir = pathlib.Path(pipe_dir)
    index = json.loads((pipe_dir / "model_index.json").read_text())
    sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
    unet, unet_cfg = _load_component(pipe_dir, "unet")
    vae, vae_cfg = _load_component(pipe_dir, "vae")
    te, _ = _load_component(pipe_dir, "text_encoder")
    tensors = _prefixed(UNET_PREFIX, unet_to_original(unet, unet_cfg))
    tensors |= _prefixed(VAE_PREFIX, vae_to_original(vae, vae_cfg))
    if sdxl:
        te2, _ = _load_component(pipe_dir, "text_encoder_2")
        tensors |= _prefixed(SDXL_CLIP_PREFIX, clip_to_original(te))
        tensors |= _prefixed(SDXL_OPEN_CLIP_PREFIX, open_clip_to_original(te2))
    else:
        tensors |= _prefixed(SD_CLIP_PREFIX, clip_to_original(te))
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out
