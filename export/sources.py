"""Where a model comes from: a hub id, a local diffusers directory or a single-file checkpoint.

Shared by the commands that take a SOURCE (`convert`, `controlnet`, `depth`, `--lora`) and by the
reference runs; torch, diffusers and safetensors are imported where they are used, so importing
this module stays cheap.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from export.errors import UserError


def looks_like_hub_id(source: str) -> bool:
    """Whether `source` has the shape of a hub id, `owner/name` (callers try local paths first)."""
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "~"))
        and not source.endswith((".safetensors", ".ckpt"))
    )


def load_model(source: str, cls: Any, subfolder: str, example: str) -> Any:
    """A diffusers model of class `cls` (ControlNetModel, AutoencoderTiny, ...) from a local
    directory (its own, or a pipeline's with a `subfolder/` holding one) or a hub id, in float32
    on CPU. A directory holding another class is a one-line UserError; `example` is a hub id to
    suggest."""
    import torch

    name = cls.__name__
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        where = "config.json"
        if not (path / where).exists() and (path / subfolder / where).exists():
            path, where = path / subfolder, f"{subfolder}/config.json"
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise UserError(
                f"{source}: not a diffusers {name} directory (no config.json); pass a directory "
                f"written by {name}.save_pretrained or a hub id such as {example}"
            )
        try:
            found = json.loads(cfg_path.read_text(encoding="utf-8")).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if found != name:
            raise UserError(
                f"{source}: {where} is the config of {found or 'an unknown class'}, not of {name}"
            )
        return cls.from_pretrained(path, torch_dtype=torch.float32)
    if path.exists():
        raise UserError(f"{source}: expected a diffusers {name} directory")
    if looks_like_hub_id(source):
        return cls.from_pretrained(source, torch_dtype=torch.float32)
    raise UserError(f"{source}: no such file or directory (and not a hub id like 'owner/name')")


def _single_file_is_sdxl(path: pathlib.Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


def _check_single_file_loaded(pipe: Any, source: str, config: str | None) -> None:
    """Fail on weights `from_single_file` left unset (on the meta device) instead of exporting them.

    diffusers fills each component from the keys it recognises and leaves the rest on the meta
    device without an error, e.g. when the checkpoint lacks a component the config names.
    """
    import torch

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [*component.named_parameters(), *component.named_buffers()]
        missing = [n for n, t in tensors if t.is_meta]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            hint = f" for --config {config}" if config is not None else ""
            raise UserError(
                f"{source}: the checkpoint has no weights{hint} for {len(missing)} tensor(s) of "
                f"{name} ({shown}); is it a complete checkpoint of the same model family?"
            )


def load_pipeline(source: str, config: str | None = None) -> Any:
    """Load `source` (local pipeline dir, single-file checkpoint or hub id) in float32 on CPU."""
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(
                f"{source}: not a diffusers pipeline directory (no model_index.json); "
                "pass a directory written by save_pretrained, a .safetensors file or a hub id"
            )
        return DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"{source}: expected a .safetensors (or .ckpt) checkpoint")
        if config is not None:
            index = pathlib.Path(config) / "model_index.json"
            if not index.exists():
                raise UserError(f"--config {config}: no model_index.json there")
            sdxl = "XL" in json.loads(index.read_text())["_class_name"]
        else:
            sdxl = path.suffix == ".safetensors" and _single_file_is_sdxl(path)
        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
        if config is not None:
            kwargs["config"] = str(config)
        try:
            pipe = cls.from_single_file(str(path), **kwargs)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            if config is not None:
                raise
            # Without --config diffusers guesses the model from the checkpoint's keys and
            # fetches that model's configs from the hub.
            raise UserError(
                f"{source}: could not fetch the diffusers config for this checkpoint from the hub "
                f"({type(exc).__name__}); pass --config DIR, a diffusers directory of the same "
                "model (model_index.json and the component config.json files), to convert offline"
            ) from None
        _check_single_file_loaded(pipe, source, config)
        return pipe
    if looks_like_hub_id(source):
        return DiffusionPipeline.from_pretrained(source, dtype=torch.float32)
    raise UserError(f"{source}: no such file or directory (and not a hub id like 'owner/name')")
