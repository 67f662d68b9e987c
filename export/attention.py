"""Fused attention: diffusers' attention exported as one `com.microsoft.MultiHeadAttention` node.

The exporter decomposes `F.scaled_dot_product_attention` into MatMul / Softmax / MatMul, which
ONNX Runtime runs as written: at 512x512 the UNet's first self-attention materialises
8 x 4096 x 4096 float32 scores (512 MiB, twice over across the Softmax) and its Softmax is a
memory-bound pass over them. ONNX Runtime's `MultiHeadAttention` contrib op takes the projected
query, key and value ([batch, sequence, heads * head_dim]) and, on CPU in float32 without mask
or bias, runs MLAS's tiled flash attention: the scores never exist as a whole. CUDA and DirectML
have their own kernels for it. TensorRT and CoreML do not take `com.microsoft` ops: ONNX Runtime
hands those nodes to CUDA / CPU, so exports for them use ``--attention plain``.

Only the attention core changes: `to_q`, `to_k`, `to_v` and `to_out` stay the same Linear layers
(their weights keep their names for runtime LoRA), and a processor is swapped in only where
diffusers uses the plain `AttnProcessor2_0` on inputs the op covers (no mask, no q/k norms,
no spatial norm); everything else keeps its own processor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import onnx
import torch
from onnxscript.values import Op, Opset

ATTENTION_MODES = ("fused", "plain")
MHA_DOMAIN = "com.microsoft"
MHA_OP = "MultiHeadAttention"


@torch.library.custom_op("tcd_ort::multi_head_attention", mutates_args=())
def multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention on [batch, sequence, heads * head_dim] tensors, as
    `AttnProcessor2_0` computes it (eager reference for the exported op)."""
    batch, length, _ = query.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(
        split(query), split(key), split(value), scale=scale
    )
    return out.transpose(1, 2).reshape(batch, length, value.shape[2]).to(query.dtype)


@multi_head_attention.register_fake
def _multi_head_attention_fake(query, key, value, heads, scale):  # noqa: ANN001, ANN202
    return query.new_empty((query.shape[0], query.shape[1], value.shape[2]))


def _mha_schema() -> onnx.defs.OpSchema:
    """The part of ONNX Runtime's contrib schema the translation uses (onnx does not ship
    contrib schemas; onnxscript needs one to emit the node)."""
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        MHA_OP,
        MHA_DOMAIN,
        1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[
            attr("num_heads", kind.INT, "number of attention heads", required=True),
            attr("scale", kind.FLOAT, "scale of Q K^T", required=False),
        ],
    )


_MHA = Op(Opset(MHA_DOMAIN, 1), MHA_OP, _mha_schema())


def _multi_head_attention_onnx(query, key, value, heads: int, scale: float):  # noqa: ANN001, ANN201
    return _MHA(query, key, value, num_heads=heads, scale=scale)


TRANSLATIONS = {torch.ops.tcd_ort.multi_head_attention.default: _multi_head_attention_onnx}


class IpBranch:
    """The IP-Adapter keys, values and per-layer scales a UNet forward reads (export/unet.py
    sets them before each call; layer `index` of `FusedAttnProcessor.ip` reads entry `index`)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.scale: torch.Tensor | None = None

    def add_to(
        self, out: torch.Tensor, query: torch.Tensor, heads: int, index: int, fused: bool
    ) -> torch.Tensor:
        """`out + scale[index] * attention(query, key[index], value[index])`, as diffusers'
        `IPAdapterAttnProcessor2_0` adds one adapter's attention before `to_out`."""
        if self.scale is None:
            raise RuntimeError("the IP-Adapter inputs were not set before the forward")
        ip = _attention(query, self.keys[index], self.values[index], heads, fused)
        return out + self.scale[index] * ip


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, fused: bool
) -> torch.Tensor:
    """Scaled dot-product attention on [batch, sequence, heads * head_dim] tensors: one
    `multi_head_attention` op (fused) or diffusers' own SDPA call (plain)."""
    # diffusers' SDPA call leaves the scale at its default, 1 / sqrt(head_dim).
    head_dim = key.shape[-1] // heads
    if fused:
        return torch.ops.tcd_ort.multi_head_attention(
            query, key, value, heads, 1.0 / math.sqrt(head_dim)
        )
    batch = query.shape[0]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class FusedAttnProcessor:
    """`AttnProcessor2_0` with the attention core as one `multi_head_attention` call
    (`fused`, the default) or diffusers' SDPA call, and optionally an IP-Adapter branch:
    `ip = (branch, index)` adds `branch`'s layer `index` before `to_out`."""

    def __init__(
        self, original: Any, fused: bool = True, ip: tuple[IpBranch, int] | None = None
    ) -> None:
        self.original = original
        self.fused = fused
        self.ip = ip

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None or args or kwargs:
            if self.ip is not None:
                raise RuntimeError("an IP-Adapter layer was called with an attention mask")
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        out = _attention(query, key, value, attn.heads, self.fused)
        if self.ip is not None:
            branch, index = self.ip
            out = branch.add_to(out, query, attn.heads, index, self.fused)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fusable(module: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    return (
        isinstance(module, Attention)
        and type(module.processor) is AttnProcessor2_0
        and module.spatial_norm is None
        and module.norm_q is None
        and module.norm_k is None
    )


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module, mode: str) -> Iterator[int]:
    """Within the block, `module`'s plain attention processors are `FusedAttnProcessor`s
    (`mode="fused"`); yields how many were swapped. The originals come back on exit."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
    swapped = []
    if mode == "fused":
        for sub in module.modules():
            if fusable(sub):
                swapped.append((sub, sub.processor))
                sub.processor = FusedAttnProcessor(sub.processor)
    try:
        yield len(swapped)
    finally:
        for sub, original in swapped:
            sub.processor = original


def graph_attention(model: onnx.ModelProto) -> str:
    """`"fused"` when the graph has `MultiHeadAttention` nodes, else `"plain"`."""
    fused = any(n.op_type == MHA_OP and n.domain == MHA_DOMAIN for n in model.graph.node)
    return "fused" if fused else "plain"
