"""The denoising UNet: `unet/`.

Inputs `sample` f32 [batch, channels, height, width], `timestep` f32 [batch] and
`encoder_hidden_states` f32 [batch, sequence, cross_attention_dim]; SDXL adds `text_embeds`
f32 [batch, pooled_dim] and `time_ids` f32 [batch, 6] (diffusers' `added_cond_kwargs`).
Then the ControlNet residuals, passed to diffusers' UNet as `down_block_additional_residuals`
and `mid_block_additional_residual`: `down_block_additional_residual_0` ...
`down_block_additional_residual_{N-1}` and `mid_block_additional_residual`, f32
[batch, C_i, height_k, width_k], one per ControlNet output (`controlnet_residual_shapes`).
`height_k` is the latent height after k stride-2 downsamplers, ceil(height / 2^k)
(`height_0` is `height`). The UNet adds them to its skip connections and mid-block output, so
all-zero residuals give the plain UNet's output: one export serves runs with and without a
ControlNet.

Then the IP-Adapter branch of every cross-attention layer (`ip_adapter_layers`: the `attn2`
layers in diffusers' `attn_processors` order, the order IP-Adapter weights are numbered in):
`ip_key_0`, `ip_value_0`, ... `ip_key_{L-1}`, `ip_value_{L-1}` f32 [batch, ip_tokens, dim_i]
(the adapter's image tokens through that layer's `to_k_ip` / `to_v_ip`, made once per
generation by the IP-Adapter's own graphs, export/ip_adapter.py) and `ip_adapter_scale` f32
[L]. Each layer adds `ip_adapter_scale[i] * attention(query, ip_key_i, ip_value_i)` before its
`to_out`, as diffusers' `IPAdapterAttnProcessor2_0` does; one zero token with scale 0 gives
the plain UNet's output exactly, at the cost of an attention over a single key per layer.
Output `out_sample`, shaped like `sample`.

With `lora_slots=RANK` the UNet is exported with empty peft LoRA layers (see
export/lora_slots.py) and `export_unet` returns the slotted module names.
A float16 export (`convert --dtype fp16`) has float16 weights and takes and returns every
float tensor above as float16, except `timestep`, which stays float32.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from export.attention import FusedAttnProcessor, IpBranch, fusable
from export.errors import UserError
from export.lora_slots import inject_slots, slot_param_name, slot_tensor_names
from export.onnx_io import Io, export_component, module_dtype

DOWN_RESIDUAL = "down_block_additional_residual_{}"
MID_RESIDUAL = "mid_block_additional_residual"
IP_KEY = "ip_key_{}"
IP_VALUE = "ip_value_{}"
IP_SCALE = "ip_adapter_scale"


@dataclass(frozen=True)
class Residual:
    """One ControlNet residual: its channel count and how many times it was downsampled."""

    channels: int
    level: int

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        h, w = height, width
        for _ in range(self.level):
            # A stride-2, padding-1, 3x3 convolution: ceil(n / 2).
            h, w = (h + 1) // 2, (w + 1) // 2
        return (batch, self.channels, h, w)

    def axes(self) -> dict[int, str]:
        if self.level == 0:
            return {0: "batch", 2: "height", 3: "width"}
        return {0: "batch", 2: f"height_{self.level}", 3: f"width_{self.level}"}


def controlnet_residual_shapes(config) -> tuple[list[Residual], Residual]:
    """The down-block residuals and the mid-block residual a ControlNet made from a UNet with
    this `config` returns, in diffusers' order: conv_in, then per down block one per resnet
    layer and one for its downsampler (all blocks but the last)."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    if isinstance(layers, int):
        layers = [layers] * len(channels)
    down = [Residual(channels[0], 0)]
    for i, (ch, n) in enumerate(zip(channels, layers, strict=True)):
        down += [Residual(ch, i)] * n
        if i < len(channels) - 1:
            down.append(Residual(ch, i + 1))
    return down, Residual(channels[-1], len(channels) - 1)


def ip_adapter_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers an IP-Adapter attends in, as diffusers' `_convert_ip_adapter_attn_to_diffusers`
    picks them: every attention processor but the self-attentions (`attn1`) and motion modules,
    in `attn_processors` order. Returns `(module name, Attention module)` pairs."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        module_name = name[: -len(".processor")]
        layers.append((module_name, unet.get_submodule(module_name)))
    return layers


def ip_layer_dims(unet: torch.nn.Module) -> list[int]:
    """The key/value width of each IP-Adapter layer (`to_k`'s output features)."""
    return [attn.to_k.out_features for _, attn in ip_adapter_layers(unet)]


@contextlib.contextmanager
def ip_adapter_branches(unet: torch.nn.Module, attention: str) -> Iterator[IpBranch]:
    """Within the block, every IP-Adapter layer of `unet` runs a `FusedAttnProcessor` with
    an IP branch reading the yielded `IpBranch`; the original processors come back on exit."""
    branch = IpBranch()
    swapped = []
    try:
        for index, (name, attn) in enumerate(ip_adapter_layers(unet)):
            if not fusable(attn):
                raise UserError(
                    f"{name}: its attention processor ({type(attn.processor).__name__}) is not "
                    "diffusers' plain AttnProcessor2_0; the IP-Adapter inputs cannot be added"
                )
            swapped.append((attn, attn.processor))
            attn.processor = FusedAttnProcessor(
                attn.processor, fused=attention == "fused", ip=(branch, index)
            )
        yield branch
    finally:
        for attn, original in swapped:
            attn.processor = original


class _UNet(torch.nn.Module):
    def __init__(
        self, unet: torch.nn.Module, sdxl: bool, residuals: int, branch: IpBranch | None
    ) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.residuals = residuals
        self.branch = branch

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        # `extra`: SDXL's text_embeds and time_ids, the down residuals and the mid one, then
        # the IP-Adapter keys and values (interleaved) and scales.
        added = None
        if self.sdxl:
            added = {"text_embeds": extra[0], "time_ids": extra[1]}
            extra = extra[2:]
        residuals, ip = extra[: self.residuals], extra[self.residuals :]
        if self.branch is not None:
            self.branch.keys = list(ip[0:-1:2])
            self.branch.values = list(ip[1:-1:2])
            self.branch.scale = ip[-1]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=tuple(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    return unet.config.addition_embed_type == "text_time"


def export_unet(
    unet: torch.nn.Module,
    out_dir: pathlib.Path,
    opset: int,
    pooled_dim: int | None = None,
    lora_slots: int | None = None,
    attention: str = "fused",
    ip_adapter: bool = True,
) -> list[str]:
    """Export `unet` to `out_dir`; returns the modules given LoRA slots (none without
    `lora_slots`). Slots are injected into `unet` itself: pass a copy to keep the original.
    `ip_adapter=False` leaves the IP-Adapter inputs out (for measuring what they cost: the
    engine runs such a UNet, without IP-Adapters)."""
    cfg = unet.config
    slotted: list[str] = []
    rename = None
    if lora_slots is not None:
        slotted = inject_slots(unet, lora_slots)
        rename = slot_param_name
    dtype = module_dtype(unet)
    # Odd-looking example sizes keep the exporter from tying unrelated dims together; an odd
    # height makes every ceil(n / 2) of the residual sizes differ from n // 2.
    batch, h, w = 2, 23, 40
    # The timestep stays float32 whatever the weights: diffusers computes the sinusoidal
    # embedding in float32 and casts it to the weights' dtype inside the graph.
    args: tuple[torch.Tensor, ...] = (
        torch.randn(batch, cfg.in_channels, h, w, dtype=dtype),
        torch.full((batch,), 999.0),
        torch.randn(batch, 77, cfg.cross_attention_dim, dtype=dtype),
    )
    image_axes = {0: "batch", 2: "height", 3: "width"}
    inputs = [
        Io("sample", image_axes),
        Io("timestep", {0: "batch"}),
        Io("encoder_hidden_states", {0: "batch", 1: "sequence"}),
    ]
    sdxl = is_sdxl_unet(unet)
    if sdxl:
        if pooled_dim is None:
            time_dim = cfg.addition_time_embed_dim
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * time_dim
        args = args + (
            torch.randn(batch, pooled_dim, dtype=dtype),
            torch.tensor([[64.0, 80.0, 0, 0, 64, 80]] * batch, dtype=dtype),
        )
        inputs += [Io("text_embeds", {0: "batch"}), Io("time_ids", {0: "batch"})]
    down, mid = controlnet_residual_shapes(cfg)
    for i, r in enumerate(down):
        args = args + (torch.randn(r.shape(batch, h, w), dtype=dtype),)
        inputs.append(Io(DOWN_RESIDUAL.format(i), r.axes()))
    args = args + (torch.randn(mid.shape(batch, h, w), dtype=dtype),)
    inputs.append(Io(MID_RESIDUAL, mid.axes()))
    # Three image tokens: any example size but 1, which the exporter would fix.
    dims = ip_layer_dims(unet) if ip_adapter else []
    for i, dim in enumerate(dims):
        args = args + tuple(torch.randn(batch, 3, dim, dtype=dtype) for _ in range(2))
        ip_axes = {0: "batch", 1: "ip_tokens"}
        inputs += [Io(IP_KEY.format(i), ip_axes), Io(IP_VALUE.format(i), ip_axes)]
    if ip_adapter:
        args = args + (torch.rand(len(dims), dtype=dtype),)
        inputs.append(Io(IP_SCALE))
    hook = None
    if sdxl and dtype != torch.float32:
        # diffusers embeds SDXL's time ids in float32 and concatenates them with the (float16)
        # text embeddings, which promotes to float32 before `.to(emb.dtype)`; the exporter
        # emits that Concat without the promotion. Casting the time embedding to the weights'
        # dtype first gives the same values (float16 -> float32 is exact, and the float32
        # values are rounded to float16 either way) and a well-typed graph.
        hook = unet.add_time_proj.register_forward_hook(lambda _m, _i, out: out.to(dtype))
    try:
        branches = ip_adapter_branches(unet, attention) if ip_adapter else contextlib.nullcontext()
        with branches as branch:
            export_component(
                _UNet(unet, sdxl, len(down) + 1, branch),
                args,
                inputs,
                [Io("out_sample", image_axes)],
                out_dir,
                opset,
                prefix="unet.",
                rename=rename,
                attention=attention,
                overridable=slot_tensor_names(slotted),
            )
    finally:
        if hook is not None:
            hook.remove()
    unet.save_config(out_dir)
    return slotted


def residual_inputs(
    config, batch: int, height: int, width: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """ControlNet residual inputs for a UNet with `config` at a latent size: zeros (the plain
    UNet) or, given a generator, standard normal values."""

    def make(r: Residual) -> torch.Tensor:
        shape = r.shape(batch, height, width)
        return torch.zeros(shape) if generator is None else torch.randn(shape, generator=generator)

    down, mid = controlnet_residual_shapes(config)
    feeds = {DOWN_RESIDUAL.format(i): make(r) for i, r in enumerate(down)}
    feeds[MID_RESIDUAL] = make(mid)
    return feeds


def ip_adapter_inputs(
    unet: torch.nn.Module, batch: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The IP-Adapter inputs of a UNet export when no adapter runs: one zero token per layer,
    scale 0 (the plain UNet's output exactly)."""
    dims = ip_layer_dims(unet)
    feeds = {}
    for i, dim in enumerate(dims):
        feeds[IP_KEY.format(i)] = torch.zeros(batch, 1, dim, dtype=dtype)
        feeds[IP_VALUE.format(i)] = torch.zeros(batch, 1, dim, dtype=dtype)
    feeds[IP_SCALE] = torch.zeros(len(dims), dtype=dtype)
    return feeds


def plain_inputs(
    unet: torch.nn.Module, batch: int, height: int, width: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every input of a UNet export besides the denoiser's own when neither a ControlNet nor
    an IP-Adapter runs: zero residuals and the zero IP-Adapter branch."""
    feeds = {k: v.to(dtype) for k, v in residual_inputs(unet.config, batch, height, width).items()}
    feeds.update(ip_adapter_inputs(unet, batch, dtype))
    return feeds
