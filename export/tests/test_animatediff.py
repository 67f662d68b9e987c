"""AnimateDiff (issue #21): `python -m export animatediff` and `tiny-motion-adapter`.

The motion UNet graph against diffusers' `UNetMotionModel` (the one `AnimateDiffPipeline`
builds from the tiny SD1.5 pipeline and a tiny random motion adapter) at several frame counts,
batch sizes and latent sizes, fused and plain attention; the names the engine's LoRAs need;
the manifest's `motion`; the refused inputs.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.animatediff import (
    NO_SLOT,
    MotionUNet,
    animatediff,
    export_motion_unet,
    load_animatediff,
)
from export.errors import UserError
from export.lora import LoraSpec, load_loras, motion_lora_to_diffusers
from export.lora_slots import LORA_A, slot_tensor_names
from export.onnx_io import initializer_names
from export.segments import segment_files
from export.tests.conftest import REUSE
from export.tests.test_segments import _run_chain
from export.tiny import build_tiny
from export.tiny_motion_adapter import build_tiny_motion_adapter

# Largest |ONNX - torch| over the largest |torch|.
TOL = 1e-5
MAX_FRAMES = 24


def _session(path: pathlib.Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _pipeline(tmp_path_factory, family: str) -> pathlib.Path:
    reused = pathlib.Path(REUSE or "/nonexistent") / family / "diffusers"
    if (reused / "model_index.json").is_file():
        return reused
    root = tmp_path_factory.mktemp(f"animatediff_{family}")
    return build_tiny(family, root / "diffusers", seed=0)


def _motion_lora(unet: torch.nn.Module, path: pathlib.Path) -> None:
    """A random motion LoRA on every motion attention, in guoyww's diffusers layout."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, module in unet.named_modules():
        if "motion_modules" in name and name.endswith((".attn1", ".attn2")):
            for proj, key in (("to_q", "to_q_lora"), ("to_out.0", "to_out_lora")):
                linear = module.get_submodule(proj)
                prefix = f"unet.{name}.processor.{key}"
                state[f"{prefix}.down.weight"] = torch.randn(4, linear.in_features, generator=g)
                state[f"{prefix}.up.weight"] = torch.randn(linear.out_features, 4, generator=g)
    save_file(state, str(path))


def _to_original(state: dict) -> dict:
    """A diffusers-layout motion LoRA under the original AnimateDiff names."""
    out = {}
    for key, value in state.items():
        head, _, tail = key.removeprefix("unet.").partition(".transformer_blocks.")
        block, attn, rest = tail.split(".", 2)
        index = {"attn1": "0", "attn2": "1"}[attn]
        name = f"{head}.temporal_transformer.transformer_blocks.{block}.attention_blocks.{index}"
        out[f"{name}.{rest}"] = value
    return out


class Exported:
    def __init__(self, base, adapter, out, manifest, pipe):
        self.base = base
        self.adapter = adapter
        self.dir = out
        self.manifest = manifest
        self.pipe = pipe
        self.unet = _session(out / "unet" / "model.onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """The tiny SD1.5 pipeline with a tiny motion adapter (24 frames at most), exported with a
    motion LoRA recorded unfused; and diffusers' AnimateDiffPipeline of the same two."""
    base = _pipeline(tmp_path_factory, "sd15")
    root = tmp_path_factory.mktemp("animatediff")
    adapter = build_tiny_motion_adapter(base, root / "adapter", seed=0, max_frames=MAX_FRAMES)
    pipe = load_animatediff(str(base), str(adapter))
    pipe.unet.eval()
    _motion_lora(pipe.unet, root / "motion_lora.safetensors")
    manifest = animatediff(
        str(base),
        str(adapter),
        root / "onnx",
        loras=[LoraSpec(str(root / "motion_lora.safetensors"), 1.2)],
    )
    out = Exported(base, adapter, root / "onnx", manifest, pipe)
    out.motion_lora = root / "motion_lora.safetensors"
    return out


def _inputs(unet, batch, frames, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, frames, h, w, generator=g)
    timestep = torch.tensor([999.0, 499.0, 1.0][:batch])
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, timestep, states


def _relative(got: np.ndarray, expected: torch.Tensor) -> float:
    ref = expected.numpy()
    assert np.abs(ref).max() > 1e-3, "an output of zeros proves nothing"
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    ("batch", "frames", "h", "w"),
    [(2, 8, 16, 16), (2, 16, 16, 16), (2, 5, 12, 20), (1, MAX_FRAMES, 8, 8), (3, 1, 8, 8)],
)
def test_motion_unet_matches_diffusers(exported, batch, frames, h, w):
    """One text row per video in the graph; diffusers' UNet gets them repeated over the frames
    as AnimateDiffPipeline repeats them (`repeat_interleave(frames, dim=0)`)."""
    unet = exported.pipe.unet
    sample, timestep, states = _inputs(unet, batch, frames, h, w)
    with torch.no_grad():
        expected = unet(sample, timestep, states.repeat_interleave(frames, dim=0)).sample
    got = exported.unet.run(
        ["out_sample"],
        {"sample": sample.numpy(), "timestep": timestep.numpy(),
         "encoder_hidden_states": states.numpy()},
    )[0]
    assert got.shape == (batch, 4, frames, h, w)
    assert _relative(got, expected) < TOL


def test_plain_attention_matches_diffusers(exported, tmp_path):
    unet = exported.pipe.unet
    export_motion_unet(unet, tmp_path / "unet", 18, attention="plain")
    model = onnx.load(str(tmp_path / "unet" / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "MultiHeadAttention" for n in model.graph.node)
    session = _session(tmp_path / "unet" / "model.onnx")
    for frames in (8, 16):
        sample, timestep, states = _inputs(unet, 2, frames, 16, 16, seed=frames)
        with torch.no_grad():
            expected = MotionUNet(unet)(sample, timestep, states)
        got = session.run(
            ["out_sample"],
            {"sample": sample.numpy(), "timestep": timestep.numpy(),
             "encoder_hidden_states": states.numpy()},
        )[0]
        assert _relative(got, expected) < TOL


def test_temporal_attention_is_fused(exported):
    """Every attention of the motion UNet, spatial and temporal, is one MultiHeadAttention."""
    model = onnx.load(str(exported.dir / "unet" / "model.onnx"), load_external_data=False)
    fused = sum(n.op_type == "MultiHeadAttention" for n in model.graph.node)
    processors = exported.pipe.unet.attn_processors
    assert any("motion_modules" in name for name in processors)
    assert fused == len(processors)
    assert exported.manifest["components"]["unet"]["attention"] == "fused"


def test_the_motion_modules_move_the_output(exported):
    """The tiny adapter is no identity: zeroing the motion modules' proj_out changes the UNet."""
    unet = exported.pipe.unet
    sample, timestep, states = _inputs(unet, 1, 8, 8, 8)
    with torch.no_grad():
        states = states.repeat_interleave(8, dim=0)
        moving = unet(sample, timestep, states).sample
        saved = {n: p.clone() for n, p in unet.named_parameters() if ".proj_out." in n and
                 "motion_modules" in n}
        for name in saved:
            unet.get_parameter(name).zero_()
        still = unet(sample, timestep, states).sample
        for name, value in saved.items():
            unet.get_parameter(name).copy_(value)
    assert saved
    assert float((moving - still).abs().max() / still.abs().max()) > 0.05


def test_names_kept(exported):
    names = initializer_names(exported.dir / "unet" / "model.onnx")
    params = {n for n, _ in exported.pipe.unet.named_parameters()}
    assert params <= names
    motion = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    assert motion in names
    assert "mid_block.motion_modules.0.transformer_blocks.0.attn2.to_out.0.weight" in names
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in names


def test_io_contract_and_manifest(exported):
    unet = exported.manifest["components"]["unet"]
    video = ["batch", 4, "frames", "height", "width"]
    assert unet["inputs"] == {
        "sample": {"dtype": "float32", "shape": video},
        "timestep": {"dtype": "float32", "shape": ["batch"]},
        "encoder_hidden_states": {"dtype": "float32", "shape": ["batch", "sequence", 32]},
    }
    assert unet["outputs"] == {"out_sample": {"dtype": "float32", "shape": video}}
    motion = {"max_frames": MAX_FRAMES, "source": str(exported.adapter)}
    assert exported.manifest["motion"] == motion
    written = json.loads((exported.dir / "tcd_ort.json").read_text())
    assert written["motion"] == exported.manifest["motion"]
    assert written["family"] == "sd15"
    lora = written["lora"]
    assert [(e["weight"], pathlib.Path(e["source"]).name) for e in lora] == [
        (1.2, "motion_lora.safetensors")
    ]
    for name in ("text_encoder", "vae_decoder", "vae_encoder", "tokenizer", "scheduler"):
        assert (exported.dir / name).is_dir()
    config = json.loads((exported.dir / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNetMotionModel"
    assert config["motion_max_seq_length"] == MAX_FRAMES
    index = json.loads((exported.dir / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline"


def test_segments_compute_the_whole_motion_unet(exported):
    unet_dir = exported.dir / "unet"
    files = segment_files(unet_dir)
    assert files == exported.manifest["components"]["unet"]["segments"] == [
        "segment_0.onnx", "segment_1.onnx"
    ]
    sample, timestep, states = _inputs(exported.pipe.unet, 2, 5, 8, 12)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(),
             "encoder_hidden_states": states.numpy()}
    expected = exported.unet.run(["out_sample"], feeds)[0]
    got = _run_chain([unet_dir / f for f in files], feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_lora_slots(exported, tmp_path):
    """Slots on every target module (motion attentions too) but the motion modules' proj_in /
    proj_out; empty, they compute the plain UNet."""
    import copy

    unet = copy.deepcopy(exported.pipe.unet)
    slotted = export_motion_unet(unet, tmp_path / "unet", 18, lora_slots=4)
    motion = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q"
    assert motion in slotted
    assert "down_blocks.1.attentions.0.proj_in" in slotted
    assert not [m for m in slotted if re.fullmatch(NO_SLOT, m)]
    assert not [m for m in slotted if "motion_modules" in m and m.endswith(("proj_in", "proj_out"))]
    names = initializer_names(tmp_path / "unet" / "model.onnx")
    assert LORA_A.format(module=motion) in names and f"{motion}.weight" in names
    sample, timestep, states = _inputs(unet, 2, 8, 8, 8)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(),
             "encoder_hidden_states": states.numpy()}
    sess = _session(tmp_path / "unet" / "model.onnx")
    got = sess.run(["out_sample"], feeds)[0]
    np.testing.assert_allclose(got, exported.unet.run(["out_sample"], feeds)[0], atol=1e-5)
    # The slots are overridable initializers, fed at run time (export/lora_slots.py).
    over = {i.name for i in sess.get_overridable_initializers()}
    assert over == set(slot_tensor_names(slotted))
    assert [i.name for i in sess.get_inputs()] == list(feeds)


def test_original_motion_lora_layout(exported, tmp_path):
    """An original-layout motion LoRA loads as the same adapter as diffusers' layout
    (diffusers' own loader reads only the latter: load_loras converts the former)."""
    state = load_file(str(exported.motion_lora))
    original = _to_original(state)
    assert motion_lora_to_diffusers(original).keys() == state.keys()
    save_file(original, str(tmp_path / "original.safetensors"))
    pipe = exported.pipe
    sample, timestep, states = _inputs(pipe.unet, 1, 4, 8, 8)
    states = states.repeat_interleave(4, dim=0)
    outputs = []
    for path in (exported.motion_lora, tmp_path / "original.safetensors"):
        load_loras(pipe, [LoraSpec(str(path), 1.2)])
        with torch.no_grad():
            outputs.append(pipe.unet(sample, timestep, states).sample)
        pipe.unload_lora_weights()
    with torch.no_grad():
        plain = pipe.unet(sample, timestep, states).sample
    assert torch.equal(outputs[0], outputs[1])
    assert float((outputs[0] - plain).abs().max()) > 1e-3


def test_refuses_a_lora_without_a_layer_of_the_model(exported, tmp_path):
    save_file({"foo.lora_A.weight": torch.zeros(4, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="found no layer of this model"):
        load_loras(exported.pipe, [LoraSpec(str(tmp_path / "x.safetensors"))])
    exported.pipe.unload_lora_weights()


# --- tiny-motion-adapter ------------------------------------------------------------------


def test_tiny_motion_adapter(exported, tmp_path, cli_in_process):
    code, err = cli_in_process(
        "-q", "tiny-motion-adapter", "--unet", exported.base, tmp_path / "a", "--seed", "5",
        "--max-frames", "12",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    base = json.loads((exported.base / "unet" / "config.json").read_text())
    assert config["_class_name"] == "MotionAdapter"
    assert config["block_out_channels"] == base["block_out_channels"]
    assert config["motion_layers_per_block"] == base["layers_per_block"]
    assert config["motion_max_seq_length"] == 12
    weights = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    # Every parameter random (diffusers zero-initialises proj_out); the sinusoidal position
    # tables (`pos_embed.pe`, buffers) are diffusers' own.
    params = {k: w for k, w in weights.items() if not k.endswith(".pe")}
    assert any(k.endswith("proj_out.weight") for k in params)
    assert all(bool((w != 0).all()) for w in params.values())
    build_tiny_motion_adapter(exported.base, tmp_path / "b", seed=5, max_frames=12)
    build_tiny_motion_adapter(exported.base, tmp_path / "c", seed=6, max_frames=12)
    same = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    other = load_file(str(tmp_path / "c" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not any(torch.equal(weights[k], other[k]) for k in weights if weights[k].ndim == 2)
    code, err = cli_in_process("-q", "tiny-motion-adapter", "--unet", tmp_path, tmp_path / "d")
    assert code == 2 and "not a diffusers pipeline directory" in err


# --- refused inputs -----------------------------------------------------------------------


def _adapter_config(path: pathlib.Path, **overrides) -> pathlib.Path:
    """A MotionAdapter directory holding only a config (the checks run before the weights
    load)."""
    config = {
        "_class_name": "MotionAdapter",
        "block_out_channels": [32, 64],
        "motion_layers_per_block": 2,
        "motion_max_seq_length": 32,
        "motion_norm_num_groups": 2,
        "motion_num_attention_heads": 4,
        "use_motion_mid_block": True,
        "conv_in_channels": None,
    }
    config.update(overrides)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _refused(cli_in_process, base, adapter, out) -> str:
    code, err = cli_in_process("-q", "animatediff", base, adapter, out)
    assert code == 2, err
    # transformers' weight-loading progress bars may come first (it was imported before the
    # CLI could quiet it); the error is one line.
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return errors[0]


def test_refuses_what_is_not_a_motion_adapter(exported, tmp_path, cli_in_process):
    out = tmp_path / "out"
    err = _refused(cli_in_process, exported.base, exported.base / "unet", out)
    assert "a UNet2DConditionModel, not a MotionAdapter" in err
    err = _refused(cli_in_process, exported.base, exported.base, out)
    assert "a pipeline directory" in err
    err = _refused(cli_in_process, exported.base, tmp_path / "missing", out)
    assert "no such directory" in err
    weights = exported.adapter / "diffusion_pytorch_model.safetensors"
    err = _refused(cli_in_process, exported.base, weights, out)
    assert "single-file motion modules are not supported" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_out_channels": [320, 640, 1280]}, "SDXL motion adapter: not supported yet"),
        ({"block_out_channels": [64, 128]}, "block_out_channels [64, 128]"),
        ({"motion_layers_per_block": 1}, "[1, 1] motion layers per block"),
        ({"conv_in_channels": 9}, "PIA motion adapters"),
    ],
)
def test_refuses_an_adapter_for_another_base(exported, tmp_path, cli_in_process, overrides,
                                             message):
    adapter = _adapter_config(tmp_path / "adapter", **overrides)
    err = _refused(cli_in_process, exported.base, adapter, tmp_path / "out")
    assert message in err


@pytest.mark.parametrize(
    ("family", "message"),
    [("sdxl", "SDXL motion adapters (AnimateDiffSDXLPipeline) are not supported yet"),
     ("sd15-inpaint", "an inpainting model")],
)
def test_refuses_other_bases(tmp_path_factory, tmp_path, cli_in_process, family, message):
    base = _pipeline(tmp_path_factory, family)
    adapter = _adapter_config(tmp_path / "adapter")
    err = _refused(cli_in_process, base, adapter, tmp_path / "out")
    assert message in err


def test_a_refused_export_leaves_the_out_dir(exported, tmp_path, cli_in_process):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    adapter = _adapter_config(tmp_path / "adapter", block_out_channels=[64, 128])
    code, err = cli_in_process("-q", "animatediff", exported.base, adapter, out, "--overwrite")
    assert code == 2 and "block_out_channels" in err
    assert (out / "keep").read_text() == "x"
    code, err = cli_in_process("-q", "animatediff", exported.base, exported.adapter, out)
    assert code == 2 and "--overwrite" in err
