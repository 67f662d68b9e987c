"""`convert --lora ... [--fuse-lora]`: the fused export against diffusers' own fused pipeline,
the manifest entry of an unfused export, `PATH:WEIGHT` parsing and the errors bad LoRAs give.

The LoRAs are random (seeded), written here in diffusers' format (peft keys under `unet.` /
`text_encoder.`, no metadata, so alpha = rank) and kohya's (`lora_unet_...` with `.alpha`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from export.cli import main as cli_main
from export.convert import convert
from export.errors import UserError
from export.lora import LoraSpec, parse_lora_spec, resolve_lora
from export.tiny import build_tiny
from export.unet import plain_inputs

TOL = 1e-4
RANK = 4


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _targets(pipe):
    """A few Linear, 1x1 and 3x3 conv layers in the UNet and the text encoder's attention."""
    picks = {
        "unet": (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            "down_blocks.1.attentions.0.proj_in",
            "mid_block.resnets.0.conv1",
            "up_blocks.0.resnets.1.time_emb_proj",
        ),
        "text_encoder": (
            "encoder.layers.0.self_attn.q_proj",
            "encoder.layers.1.mlp.fc1",
        ),
    }
    out = {}
    for comp, names in picks.items():
        mods = dict(getattr(pipe, comp).named_modules())
        out[comp] = {n: mods[n].weight.shape for n in names}
    return out


def _file_module(comp, name):
    # LoRA files keep the `text_model.` prefix transformers 5 dropped from CLIPTextModel.
    return name if comp == "unet" else f"text_model.{name}"


def _ab(shape, g):
    if len(shape) == 4:
        a = torch.randn(RANK, shape[1], *shape[2:], generator=g) * 0.2
        b = torch.randn(shape[0], RANK, 1, 1, generator=g) * 0.2
    else:
        a = torch.randn(RANK, shape[1], generator=g) * 0.2
        b = torch.randn(shape[0], RANK, generator=g) * 0.2
    return a.contiguous(), b.contiguous()


def write_diffusers_lora(pipe, path: pathlib.Path, seed: int) -> pathlib.Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, mods in _targets(pipe).items():
        for name, shape in mods.items():
            a, b = _ab(shape, g)
            sd[f"{comp}.{_file_module(comp, name)}.lora_A.weight"] = a
            sd[f"{comp}.{_file_module(comp, name)}.lora_B.weight"] = b
    save_file(sd, str(path))
    return path


def write_kohya_lora(pipe, path: pathlib.Path, seed: int, alpha: float = 2.0) -> pathlib.Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, mods in _targets(pipe).items():
        prefix = "lora_unet" if comp == "unet" else "lora_te"
        for name, shape in mods.items():
            a, b = _ab(shape, g)
            key = f"{prefix}_{_file_module(comp, name).replace('.', '_')}"
            sd[f"{key}.lora_down.weight"] = a
            sd[f"{key}.lora_up.weight"] = b
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("lora")
    src = build_tiny("sd15", root / "diffusers", seed=0)
    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    loras = root / "loras"
    loras.mkdir()
    a = write_diffusers_lora(pipe, loras / "style.safetensors", seed=1)
    b = write_kohya_lora(pipe, loras / "kohya.safetensors", seed=2)
    return {"root": root, "src": src, "a": a, "b": b}


def _session(path: pathlib.Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _unet_feeds(unet):
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([499.0]),
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
    }


def _outputs(pipe, onnx_dir: pathlib.Path):
    """(diffusers, onnx) outputs of the unet and text encoder on fixed inputs."""
    feeds = _unet_feeds(pipe.unet)
    ids = pipe.tokenizer(
        ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref_unet = pipe.unet(**feeds).sample.numpy()
        ref_te = pipe.text_encoder(ids).last_hidden_state.numpy()
    unet = _session(onnx_dir / "unet" / "model.onnx")
    zeros = plain_inputs(pipe.unet, 1, 16, 16)  # no ControlNet, no IP-Adapter
    got_unet = unet.run(["out_sample"], {k: v.numpy() for k, v in {**feeds, **zeros}.items()})[0]
    te = _session(onnx_dir / "text_encoder" / "model.onnx")
    got_te = te.run(["last_hidden_state"], {"input_ids": ids.numpy().astype(np.int32)})[0]
    return (ref_unet, ref_te), (got_unet, got_te)


def test_fused_export_matches_diffusers_fused_pipeline(tiny_sd15, tmp_path):
    from diffusers import DiffusionPipeline

    src, a, b = tiny_sd15["src"], tiny_sd15["a"], tiny_sd15["b"]
    out = tmp_path / "fused"
    manifest = convert(
        str(src), out, loras=[LoraSpec(str(a)), LoraSpec(str(b), 0.7)], fuse_lora=True
    )
    assert manifest["lora"] == []
    assert [e["weight"] for e in manifest["fused_lora"]] == [1.0, 0.7]

    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        base_unet = pipe.unet(**_unet_feeds(pipe.unet)).sample.numpy()
    pipe.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="style")
    pipe.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="kohya")
    pipe.set_adapters(["style", "kohya"], adapter_weights=[1.0, 0.7])
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    (ref_unet, ref_te), (got_unet, got_te) = _outputs(pipe, out)
    assert _max_diff(got_unet, ref_unet) <= TOL
    assert _max_diff(got_te, ref_te) <= TOL
    # The LoRAs really moved the outputs (so the comparison above is not base vs base).
    assert _max_diff(ref_unet, base_unet) > 1e-2


def test_unfused_export_records_loras_and_keeps_base(tiny_sd15, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    src, a = tiny_sd15["src"], tiny_sd15["a"]
    out = tmp_path / "unfused"
    # A relative path on the command line is stored absolute.
    monkeypatch.chdir(a.parent)
    rc = cli_main(["-q", "convert", str(src), str(out), "--lora", f"{a.name}:0.8"])
    assert rc == 0
    manifest = json.loads((out / "tcd_ort.json").read_text())
    assert manifest["lora"] == [{"source": str(a.resolve()), "weight": 0.8, "weight_name": None}]
    assert manifest["fused_lora"] == []
    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    (ref_unet, ref_te), (got_unet, got_te) = _outputs(pipe, out)
    assert _max_diff(got_unet, ref_unet) <= TOL
    assert _max_diff(got_te, ref_te) <= TOL


@pytest.mark.parametrize(
    "text,source,weight",
    [
        ("a.safetensors", "a.safetensors", 1.0),
        ("a.safetensors:0.7", "a.safetensors", 0.7),
        ("a.safetensors:-1.5", "a.safetensors", -1.5),
        ("a.safetensors:1e-1", "a.safetensors", 0.1),
        ("a.safetensors:.5", "a.safetensors", 0.5),
        ("owner/name:2", "owner/name", 2.0),
        ("C:\\loras\\tcd.safetensors", "C:\\loras\\tcd.safetensors", 1.0),
        ("C:\\loras\\tcd.safetensors:0.25", "C:\\loras\\tcd.safetensors", 0.25),
        ("C:/loras/tcd.safetensors", "C:/loras/tcd.safetensors", 1.0),
        ("C:5", "C:5", 1.0),  # the file `5` on drive C, not a weight
        ("./a:b.safetensors", "./a:b.safetensors", 1.0),
        ("a.safetensors:nan", "a.safetensors:nan", 1.0),  # not a number we read as a weight
        (":0.5", ":0.5", 1.0),
    ],
)
def test_parse_lora_spec(text, source, weight):
    spec = parse_lora_spec(text)
    assert (spec.source, spec.weight) == (source, weight)


def test_parse_lora_spec_prefers_an_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors:2").write_bytes(b"")
    assert parse_lora_spec("x.safetensors:2") == LoraSpec("x.safetensors:2", 1.0)


@pytest.mark.parametrize("text", ["", "  ", "a.safetensors:1e999"])
def test_parse_lora_spec_rejects(text):
    with pytest.raises(UserError):
        parse_lora_spec(text)


def _bad_files(root: pathlib.Path, good: pathlib.Path) -> dict[str, pathlib.Path]:
    data = good.read_bytes()
    files = {
        "truncated": (root / "truncated.safetensors", data[: len(data) // 2]),
        "garbage": (root / "garbage.safetensors", bytes(range(256)) * 8),
        "pickle": (root / "lora.ckpt", b"not really a pickle"),
        "bin": (root / "lora.bin", b"x"),
        "text": (root / "lora.txt", b"x"),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {k: p for k, (p, _) in files.items()}


@pytest.mark.parametrize(
    "which,message",
    [
        ("truncated", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
        ("pickle", "pickled LoRA files"),
        ("bin", "pickled LoRA files"),
        ("text", "expected a .safetensors file"),
    ],
)
def test_resolve_rejects_bad_files(tiny_sd15, tmp_path, which, message):
    bad = _bad_files(tmp_path, tiny_sd15["a"])
    with pytest.raises(UserError, match=message):
        resolve_lora(LoraSpec(str(bad[which])))


def test_resolve_missing_and_directories(tiny_sd15, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve_lora(LoraSpec(str(tmp_path / "missing.safetensors")))
    loras = tiny_sd15["a"].parent  # holds two .safetensors files
    with pytest.raises(UserError, match="--lora-weight-name"):
        resolve_lora(LoraSpec(str(loras)))
    spec = resolve_lora(LoraSpec(str(loras), 0.5, "style.safetensors"))
    assert spec == LoraSpec(str(tiny_sd15["a"].resolve()), 0.5, None)
    with pytest.raises(UserError, match="no nope.safetensors"):
        resolve_lora(LoraSpec(str(loras), 1.0, "nope.safetensors"))
    with pytest.raises(UserError, match="directories and hub ids only"):
        resolve_lora(LoraSpec(str(tiny_sd15["a"]), 1.0, "x.safetensors"))
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(UserError, match="no tensors"):
        resolve_lora(LoraSpec(str(empty)))


def test_convert_rejects_a_lora_for_another_base(tiny_sd15, tmp_path):
    """A LoRA whose shapes do not fit fails before anything is exported, with diffusers' reason."""
    from diffusers import DiffusionPipeline

    sdxl = DiffusionPipeline.from_pretrained(
        build_tiny("sdxl", tmp_path / "sdxl", seed=0), dtype=torch.float32
    )
    other = write_diffusers_lora(sdxl, tmp_path / "sdxl_lora.safetensors", seed=3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="diffusers could not load it"):
        convert(str(tiny_sd15["src"]), out, loras=[LoraSpec(str(other))])
    assert not (out / "unet").exists()


def test_cli_lora_argument_errors(tiny_sd15, tmp_path, capsys):
    src = str(tiny_sd15["src"])
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", src, str(tmp_path / "o1"), "--fuse-lora"])
    assert exc.value.code == 2
    assert "--fuse-lora needs at least one --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", src, str(tmp_path / "o2"), "--lora", str(tmp_path / "nope.st")])
    assert exc.value.code == 2
    assert "no such file" in capsys.readouterr().err
