"""`convert` on original-layout single-file checkpoints (the A1111 / ComfyUI `.safetensors`).

No such checkpoint is committed or downloaded: export/single_file.py writes the tiny diffusers
pipelines in the original layout, and the models exported from that file with `--config` must
equal the ones exported from the diffusers directory.

The SD1.5 test exports through ONNX (~35 s on top of the shared `sd15` fixture). For SDXL the
default test compares the loaded PyTorch weights, which fixes the export; the full ONNX
comparison is opt-in with TCD_ORT_SLOW_TESTS=1 (~75 s).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.convert import convert, detect_family
from export.errors import UserError
from export.single_file import (
    SD_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    pipeline_to_single_file,
)
from export.sources import _single_file_is_sdxl, load_pipeline
from export.tiny import build_tiny

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-4
COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
# Concrete sizes for the exported graphs' dynamic axes.
AXES = {"batch": 1, "height": 16, "width": 16, "sequence": 77, "ip_tokens": 4}
# The UNet's ControlNet residuals after k downsamplers: ceil(16 / 2^k).
AXES.update({f"{axis}_{k}": -(-16 // 2**k) for axis in ("height", "width") for k in (1, 2, 3)})
SLOW = os.environ.get("TCD_ORT_SLOW_TESTS") == "1"


def _offline_env(tmp_path: pathlib.Path) -> dict[str, str]:
    # An empty HF cache: nothing the machine may have cached can stand in for --config.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


def _initializers(model_path: pathlib.Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feeds(sess, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else AXES[d] for d in i.shape]
        if i.type == "tensor(int32)":
            feeds[i.name] = rng.integers(0, 49408, shape).astype(np.int32)
        elif i.name == "timestep":
            feeds[i.name] = np.full(shape, 499.0, np.float32)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_same_export(want: pathlib.Path, got: pathlib.Path, components: list[str]) -> None:
    import onnxruntime as ort

    for c in components:
        a, b = _initializers(want / c / "model.onnx"), _initializers(got / c / "model.onnx")
        assert sorted(a) == sorted(b), c
        differ = [n for n in a if not np.array_equal(a[n], b[n])]
        assert not differ, (c, differ[:5])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        cpu = ["CPUExecutionProvider"]
        sessions = [
            ort.InferenceSession(str(d / c / "model.onnx"), opts, providers=cpu)
            for d in (want, got)
        ]
        feeds = _feeds(sessions[0], seed=len(c))
        for x, y in zip(*(s.run(None, feeds) for s in sessions), strict=True):
            assert float(np.abs(x - y).max()) <= TOL, c
        # `_name_or_path` records where diffusers loaded the source from, nothing the engine reads.
        configs = [json.loads((d / c / "config.json").read_text()) for d in (want, got)]
        for cfg in configs:
            cfg.pop("_name_or_path", None)
        assert configs[0] == configs[1], c
    for f in ["tcd_ort.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"]:
        assert json.loads((want / f).read_text()) == json.loads((got / f).read_text()), f


def _assert_same_weights(want, got, components: list[str]) -> None:
    for c in components:
        a, b = getattr(want, c).state_dict(), getattr(got, c).state_dict()
        assert sorted(a) == sorted(b), c
        meta = [n for n, t in b.items() if t.is_meta]
        assert not meta, (c, meta[:5])
        differ = [n for n in a if not torch.equal(a[n], b[n])]
        assert not differ, (c, differ[:5])


def _widen_text_encoder_2(src: pathlib.Path, dst: pathlib.Path, width: int = 48) -> pathlib.Path:
    """The tiny SDXL pipeline with a `width`-wide, freshly initialised text_encoder_2 and UNet.

    In the tiny SDXL both text encoders are 32 wide, and diffusers' from_single_file tells the
    CLIP ViT-L from the OpenCLIP one by that width (768 vs 1280 in real SDXL): it would fill
    text_encoder_2 from `conditioner.embedders.0`. Different widths keep the test on the path
    real checkpoints take.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shutil.copytree(src, dst)
    te1 = json.loads((src / "text_encoder" / "config.json").read_text())["hidden_size"]
    torch.manual_seed(7)
    cfg = CLIPTextConfig.from_pretrained(src / "text_encoder_2", hidden_size=width)
    CLIPTextModelWithProjection(cfg).save_pretrained(dst / "text_encoder_2")
    unet_cfg = UNet2DConditionModel.load_config(src / "unet")
    unet = UNet2DConditionModel.from_config(unet_cfg, cross_attention_dim=te1 + width)
    unet.save_pretrained(dst / "unet")
    return dst


@pytest.fixture(scope="module")
def sdxl_src(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("single-file-sdxl")
    return _widen_text_encoder_2(build_tiny("sdxl", root / "tiny", seed=0), root / "diffusers")


def test_sd15_layout(sd15, tmp_path):
    from safetensors import safe_open

    ckpt = pipeline_to_single_file(sd15.src, tmp_path / "sd15.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
    assert UNET_PREFIX + "input_blocks.1.0.in_layers.0.weight" in keys
    assert UNET_PREFIX + "input_blocks.3.0.op.weight" in keys
    # up_blocks.0 is a CrossAttnUpBlock2D: its upsampler comes after the transformer, in slot 2.
    assert UNET_PREFIX + "output_blocks.2.1.conv.weight" not in keys
    assert UNET_PREFIX + "output_blocks.2.2.conv.weight" in keys
    assert SD_CLIP_PREFIX + "text_model.embeddings.position_embedding.weight" in keys
    assert SD_CLIP_PREFIX + "text_model.embeddings.position_ids" in keys
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.get_tensor(VAE_PREFIX + "encoder.mid.attn_1.q.weight").ndim == 4
    assert not any(k.startswith("conditioner.") for k in keys)


def test_sd15_single_file_exports_like_the_diffusers_dir(sd15, tmp_path):
    ckpt = pipeline_to_single_file(sd15.src, tmp_path / "sd15.safetensors")
    out = tmp_path / "onnx"
    manifest = convert(str(ckpt), out, config=str(sd15.src))
    assert manifest["family"] == "sd15"
    _assert_same_export(sd15.dir, out, COMPONENTS)


def test_sdxl_single_file_loads_the_same_weights(sdxl_src, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    ckpt = pipeline_to_single_file(sdxl_src, tmp_path / "sdxl.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        fused = f.get_tensor(SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
    assert fused.shape == (3 * 48, 48)
    want = DiffusionPipeline.from_pretrained(sdxl_src, dtype=torch.float32)
    got = load_pipeline(str(ckpt), str(sdxl_src))
    assert detect_family(got) == "sdxl"
    _assert_same_weights(want, got, ["unet", "vae", "text_encoder", "text_encoder_2"])
    assert got.scheduler.config == want.scheduler.config
    # The family is read from the keys too, for checkpoints converted without --config.
    assert _single_file_is_sdxl(ckpt)


@pytest.mark.skipif(not SLOW, reason="two SDXL ONNX exports (~75 s); set TCD_ORT_SLOW_TESTS=1")
def test_sdxl_single_file_exports_like_the_diffusers_dir(sdxl_src, tmp_path):
    ckpt = pipeline_to_single_file(sdxl_src, tmp_path / "sdxl.safetensors")
    convert(str(sdxl_src), tmp_path / "from-dir")
    manifest = convert(str(ckpt), tmp_path / "from-file", config=str(sdxl_src))
    assert manifest["family"] == "sdxl"
    components = COMPONENTS + ["text_encoder_2"]
    _assert_same_export(tmp_path / "from-dir", tmp_path / "from-file", components)


def test_missing_weights_are_a_user_error(sd15, tmp_path):
    """A checkpoint without a text encoder must not export diffusers' unset (meta) weights."""
    from safetensors.torch import load_file, save_file

    full = load_file(str(pipeline_to_single_file(sd15.src, tmp_path / "full.safetensors")))
    dropped = SD_CLIP_PREFIX + "text_model.final_layer_norm."
    partial = {k: v for k, v in full.items() if not k.startswith(dropped)}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="no weights .* text_encoder"):
        load_pipeline(str(tmp_path / "partial.safetensors"), str(sd15.src))


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_single_file_without_config_offline(sd15, tmp_path):
    ckpt = pipeline_to_single_file(sd15.src, tmp_path / "sd15.safetensors")
    out = tmp_path / "onnx"
    r = _run_cli(["convert", str(ckpt), str(out)], _offline_env(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "pass --config DIR" in r.stderr
    assert not out.exists()


def test_cli_config_without_model_index(sd15, tmp_path):
    ckpt = pipeline_to_single_file(sd15.src, tmp_path / "sd15.safetensors")
    r = _run_cli(
        ["convert", str(ckpt), str(tmp_path / "onnx"), "--config", str(tmp_path)],
        _offline_env(tmp_path),
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "no model_index.json" in r.stderr
