"""LoRAs at export time: `convert --lora ID_OR_PATH[:WEIGHT] ... [--fuse-lora]`.

With `--fuse-lora` the LoRAs are baked into the exported weights exactly as diffusers does it::

    pipe.load_lora_weights(src, adapter_name="lora_0")   # one adapter per LoRA
    pipe.set_adapters(["lora_0", ...], adapter_weights=[w0, ...])
    pipe.fuse_lora(components=["unet", "text_encoder", ("text_encoder_2")])
    pipe.unload_lora_weights()                            # drops the adapters, keeps fused weights

Without it the base is exported unfused and each LoRA is listed in the manifest's `lora` list
(`{"source", "weight", "weight_name"}`) for the engine to apply when it loads the model. Either
way every LoRA is loaded into the pipeline first, so one that does not fit the base model (or
is not a LoRA at all) fails at export time with diffusers' explanation, not later in the engine.

Only safetensors files are accepted: pickled `.bin` / `.ckpt` / `.pt` LoRAs can run code when
loaded, and the engine reads safetensors only.
"""

from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass
from typing import Any

from export.errors import UserError
from export.sources import looks_like_hub_id

# A trailing `:<float>` is a weight; anything else after a colon belongs to the path
# (`C:\loras\x.safetensors`, `./a:b.safetensors`).
_WEIGHT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora` argument: a local file/dir or a hub id, its adapter weight, its file name."""

    source: str
    weight: float = 1.0
    weight_name: str | None = None

    def manifest_entry(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "weight_name": self.weight_name}


def parse_lora_spec(text: str, weight_name: str | None = None) -> LoraSpec:
    """`PATH_OR_ID[:WEIGHT]` -> LoraSpec; only a trailing `:<number>` is read as the weight.

    A single letter before the colon is a Windows drive (`C:5` is the file `5` on drive C), and
    a string that names an existing path is taken whole, so paths with colons keep working.
    """
    if not text or not text.strip():
        raise UserError("--lora: empty value; expected PATH_OR_HUB_ID[:WEIGHT]")
    source, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if (
        sep
        and head
        and _WEIGHT.match(tail.strip())
        and not re.fullmatch(r"[A-Za-z]", head)
        and not pathlib.Path(text).expanduser().exists()
    ):
        source, weight = head, float(tail)
    if not math.isfinite(weight):
        raise UserError(f"--lora {text}: the weight must be a finite number")
    return LoraSpec(source, weight, weight_name)


def _check_safetensors(path: pathlib.Path, what: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{what}: not a readable safetensors file ({exc})") from exc
    if not keys:
        raise UserError(f"{what}: the safetensors file holds no tensors")


def resolve_lora(spec: LoraSpec) -> LoraSpec:
    """Check a local source and make it absolute; hub ids are left to diffusers.

    The manifest stores what this returns, so a model directory written from a relative path
    still finds its LoRA when the engine runs from another working directory.
    """
    what = f"--lora {spec.source}"
    path = pathlib.Path(spec.source).expanduser()
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(
                f"{what}: pickled LoRA files ({path.suffix}) are not supported; convert it to "
                ".safetensors first"
            )
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{what}: expected a .safetensors file")
        if spec.weight_name is not None:
            raise UserError(f"{what}: --lora-weight-name applies to directories and hub ids only")
        _check_safetensors(path, what)
        return LoraSpec(str(path.resolve()), spec.weight, None)
    if path.is_dir():
        name = spec.weight_name
        if name is None:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                raise UserError(
                    f"{what}: found {len(found)} .safetensors files in the directory; "
                    "pick one with --lora-weight-name"
                )
            name = found[0]
        file = path / name
        if not file.is_file():
            raise UserError(f"{what}: no {name} in the directory")
        if file.suffix.lower() != ".safetensors":
            raise UserError(f"{what}: --lora-weight-name must name a .safetensors file")
        _check_safetensors(file, f"{what}/{name}")
        return LoraSpec(str(file.resolve()), spec.weight, None)
    if looks_like_hub_id(spec.source):
        return spec
    raise UserError(f"{what}: no such file or directory (and not a hub id like 'owner/name')")


def lora_components(pipe: Any) -> list[str]:
    """The LoRA-injectable components present: unet, text_encoder and SDXL's text_encoder_2."""
    names = ["unet", "text_encoder", "text_encoder_2"]
    return [n for n in names if getattr(pipe, n, None) is not None]


def is_original_motion_lora(keys: list[str]) -> bool:
    """Whether a LoRA's keys are the original AnimateDiff motion LoRA layout (guoyww's
    v2_lora_*.ckpt: `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.
    attention_blocks.0.processor.to_q_lora.down.weight`, no `unet.` prefix)."""
    return (
        bool(keys)
        and not any(k.startswith("unet.") for k in keys)
        and any(".temporal_transformer." in k for k in keys)
    )


def motion_lora_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """An original-layout AnimateDiff motion LoRA in diffusers' layout, the mapping of diffusers'
    scripts/convert_animatediff_motion_lora_to_diffusers.py: `pos_encoder` keys dropped,
    `.norms.0` / `.norms.1` / `.ff_norm` -> `.norm1` / `.norm2` / `.norm3`, `.attention_blocks.0`
    / `.1` -> `.attn1` / `.attn2`, `.temporal_transformer` removed, every key prefixed `unet.`
    (`load_lora_weights` reads only this layout)."""
    out = {}
    for key, value in state.items():
        if "pos_encoder" in key:
            continue
        name = (
            key.replace(".norms.0", ".norm1")
            .replace(".norms.1", ".norm2")
            .replace(".ff_norm", ".norm3")
            .replace(".attention_blocks.0", ".attn1")
            .replace(".attention_blocks.1", ".attn2")
            .replace(".temporal_transformer", "")
        )
        out[f"unet.{name}"] = value
    return out


def _original_motion_lora(path: pathlib.Path) -> dict[str, Any] | None:
    """The LoRA file at `path` converted to diffusers' layout when it is an original-layout
    AnimateDiff motion LoRA, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if not is_original_motion_lora(keys):
        return None
    return motion_lora_to_diffusers(load_file(str(path)))


def _adapters(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def load_loras(pipe: Any, specs: list[LoraSpec]) -> list[str]:
    """Load each LoRA as its own adapter (`lora_0`, `lora_1` ...) and set their weights.

    An original-layout AnimateDiff motion LoRA is converted in memory first
    (`motion_lora_to_diffusers`); a LoRA in which diffusers finds nothing for this pipeline
    (it loads such files silently, as no adapter) is refused."""
    names = []
    for i, spec in enumerate(specs):
        name = f"lora_{i}"
        src = pathlib.Path(spec.source)
        kwargs: dict[str, Any] = {"adapter_name": name}
        if spec.weight_name is not None:
            kwargs["weight_name"] = spec.weight_name
        target: Any = spec.source
        if src.is_file():
            target, kwargs["weight_name"] = str(src.parent), src.name
            converted = _original_motion_lora(src)
            if converted is not None:
                target = converted
                del kwargs["weight_name"]
        try:
            pipe.load_lora_weights(target, **kwargs)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
            raise UserError(f"--lora {spec.source}: diffusers could not load it: {exc}") from exc
        if name not in _adapters(pipe):
            raise UserError(
                f"--lora {spec.source}: diffusers found no layer of this model in it (a LoRA "
                "for another kind of model?)"
            )
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[s.weight for s in specs])
    return names


def fuse_loras(pipe: Any, specs: list[LoraSpec]) -> None:
    """Bake `specs` into the weights with diffusers' fuse_lora, then drop the adapters."""
    names = load_loras(pipe, specs)
    if not names:
        return
    pipe.fuse_lora(components=lora_components(pipe), adapter_names=names)
    pipe.unload_lora_weights()


def check_loras_fit(pipe: Any, specs: list[LoraSpec]) -> None:
    """Load and unload `specs`, leaving the pipeline unchanged, so a LoRA that does not fit the
    base fails at export time."""
    if specs:
        load_loras(pipe, specs)
        pipe.unload_lora_weights()
