"""The directory layout, the manifest and the initializer names the engine relies on."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from export.onnx_io import initializer_names

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _components(family):
    names = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    return names + (["text_encoder_2"] if family == "sdxl" else [])


def _modules(exported, component):
    pipe = exported.pipe
    if component.startswith("text_encoder"):
        return {"": getattr(pipe, component)}
    if component == "unet":
        return {"": pipe.unet}
    if component == "vae_decoder":
        return {"decoder.": pipe.vae.decoder, "post_quant_conv.": pipe.vae.post_quant_conv}
    return {"encoder.": pipe.vae.encoder, "quant_conv.": pipe.vae.quant_conv}


def test_layout(exported):
    d = exported.dir
    for f in ["model_index.json", "scheduler/scheduler_config.json", "tcd_ort.json"]:
        assert (d / f).is_file(), f
    toks = ["tokenizer"] + (["tokenizer_2"] if exported.family == "sdxl" else [])
    for t in toks:
        for f in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
            assert (d / t / f).is_file(), (t, f)
    # SD2's tokenizer pads with "!" (id 0), SD1's with <|endoftext|>; SDXL has one of each.
    pads = {"sd15": ["<|endoftext|>"], "sd21v": ["!"], "sdxl": ["<|endoftext|>", "!"]}
    for t, pad in zip(toks, pads[exported.family], strict=True):
        assert json.loads((d / t / "tokenizer_config.json").read_text())["pad_token"] == pad, t
    for c in _components(exported.family):
        for f in ["model.onnx", "model.onnx_data", "config.json"]:
            assert (d / c / f).is_file(), (c, f)
        m = onnx.load(str(d / c / "model.onnx"), load_external_data=False)
        locations = {
            e.value
            for init in m.graph.initializer
            for e in init.external_data
            if e.key == "location"
        }
        assert locations == {"model.onnx_data"}, c
    vae_cfg = json.loads((d / "vae_decoder" / "config.json").read_text())
    assert vae_cfg["_class_name"] == "AutoencoderKL"
    assert vae_cfg["scaling_factor"] == (0.13025 if exported.family == "sdxl" else 0.18215)
    assert json.loads((d / "vae_encoder" / "config.json").read_text()) == vae_cfg


def test_initializers_keep_parameter_names(exported):
    for component in _components(exported.family):
        inits = initializer_names(exported.dir / component / "model.onnx")
        for prefix, module in _modules(exported, component).items():
            names = [prefix + n for n, _ in module.named_parameters()]
            missing = [n for n in names if n not in inits]
            assert names and not missing, (component, missing[:5])
    inits = initializer_names(exported.dir / "unet" / "model.onnx")
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" in inits


def test_manifest(exported):
    m = json.loads((exported.dir / "tcd_ort.json").read_text())
    assert m == exported.manifest
    assert m["format_version"] == 1
    # The tiny SD2 models are too narrow for width-based detection; the "!" pad token decides.
    assert m["family"] == {"sd21v": "sd21"}.get(exported.family, exported.family)
    v = exported.family == "sd21v"
    assert m["prediction_type"] == ("v_prediction" if v else "epsilon")
    sched = json.loads((exported.dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == m["prediction_type"]
    assert m["dtype"] == "float32"
    assert m["weights_keep_names"] is True
    assert m["lora"] == []
    ex = m["exporter"]
    assert ex["name"] == "tcd-ort-export" and ex["opset"] == 18
    assert "dynamo=True" in ex["method"]
    for k in ("torch", "diffusers", "transformers", "onnx"):
        assert ex[k]
    comps = m["components"]
    assert sorted(comps) == sorted(_components(exported.family))

    unet = comps["unet"]
    assert unet["inputs"]["sample"] == {
        "dtype": "float32",
        "shape": ["batch", 4, "height", "width"],
    }
    assert unet["inputs"]["timestep"] == {"dtype": "float32", "shape": ["batch"]}
    assert unet["inputs"]["encoder_hidden_states"]["shape"][:2] == ["batch", "sequence"]
    assert list(unet["outputs"]) == ["out_sample"]
    te = comps["text_encoder"]
    assert te["inputs"] == {"input_ids": {"dtype": "int32", "shape": ["batch", 77]}}
    assert list(te["outputs"])[:2] == ["last_hidden_state", "pooler_output"]
    assert comps["vae_decoder"]["inputs"]["latent_sample"]["shape"] == [
        "batch", 4, "height", "width"
    ]
    assert list(comps["vae_decoder"]["outputs"]) == ["sample"]
    assert comps["vae_encoder"]["outputs"]["latent_parameters"]["shape"][:2] == ["batch", 8]
    # The ControlNet residuals (tiny UNets: conv_in, 2 + 2 resnets, 1 downsampler), zeros
    # without a ControlNet.
    residuals = [f"down_block_additional_residual_{i}" for i in range(6)]
    residuals.append("mid_block_additional_residual")
    inputs = unet["inputs"]
    assert inputs["down_block_additional_residual_0"] == {
        "dtype": "float32",
        "shape": ["batch", 32, "height", "width"],
    }
    assert inputs["down_block_additional_residual_4"]["shape"] == [
        "batch", 64, "height_1", "width_1"
    ]
    assert inputs["mid_block_additional_residual"]["shape"] == [
        "batch", 64, "height_1", "width_1"
    ]
    # Then the IP-Adapter branch: a key and a value per cross-attention layer, and the scales
    # (tiny UNets: 2 + 3 + 1 layers in SD1.x, (2 + 3 + 1) x 2 transformer layers in SDXL).
    layers = 12 if exported.family == "sdxl" else 6
    ip = [f"ip_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    ip.append("ip_adapter_scale")
    assert inputs["ip_key_0"] == {"dtype": "float32", "shape": ["batch", "ip_tokens", 64]}
    assert inputs["ip_adapter_scale"] == {"dtype": "float32", "shape": [layers]}
    if exported.family == "sdxl":
        assert list(unet["inputs"]) == [
            "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", *residuals,
            *ip,
        ]
        assert unet["inputs"]["time_ids"]["shape"] == ["batch", 6]
        te2 = comps["text_encoder_2"]["outputs"]
        assert list(te2)[:2] == ["last_hidden_state", "text_embeds"]
        assert [k for k in te2 if k.startswith("hidden_states.")] == [
            f"hidden_states.{i}" for i in range(6)
        ]
    else:
        assert list(unet["inputs"]) == [
            "sample", "timestep", "encoder_hidden_states", *residuals, *ip
        ]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "/nonexistent/pipeline", "OUT"], "no such file or directory"),
        (["/nonexistent/pipeline", "OUT"], "no such file or directory"),
        (["convert", "{tmp}", "OUT"], "not a diffusers pipeline directory"),
        (["tiny", "--family", "sd3", "OUT"], "invalid choice"),
        (["reference", "--model", "/nonexistent/pipeline", "--prompt", "x"], "error"),
    ],
)
def test_bad_inputs(tmp_path, args, needle, cli_in_process):
    args = [a.replace("{tmp}", str(tmp_path)).replace("OUT", str(tmp_path / "out")) for a in args]
    code, stderr = cli_in_process(*args)
    assert code != 0
    assert needle in stderr


def test_a_bad_input_exits_2_without_a_traceback(tmp_path):
    # One real process: the exit status and stderr as a shell sees them.
    r = _cli("convert", "/nonexistent/pipeline", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "no such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_refuses_to_overwrite(sd15, tmp_path, cli_in_process):
    (tmp_path / "keep.txt").write_text("x")
    code, stderr = cli_in_process("convert", str(sd15.src), str(tmp_path))
    assert code == 2 and "--overwrite" in stderr
    assert (tmp_path / "keep.txt").exists()
