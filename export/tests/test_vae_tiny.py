"""The tiny VAE (diffusers' AutoencoderTiny, TAESD): the random-weight model for tiny pipelines,
its `vae-tiny` export (layout, manifest, names, decode / encode against PyTorch at several sizes
and batches, float16) and the CLI's refusal of other sources."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.errors import UserError
from export.onnx_io import initializer_names
from export.vae_tiny import (
    build_tiny_vae_tiny,
    export_vae_tiny,
    load_vae_tiny,
    measured_scale_factor,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-4, 1e-5


def _fake_pipeline(root: pathlib.Path) -> pathlib.Path:
    """Just the vae/config.json of the tiny SD1.5 pipeline: 4 latent channels, x2."""
    (root / "vae").mkdir(parents=True)
    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [32, 64],
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    }
    (root / "vae" / "config.json").write_text(json.dumps(config))
    return root


class ExportedVaeTiny:
    def __init__(self, src: pathlib.Path, onnx_dir: pathlib.Path, manifest: dict) -> None:
        self.src = src
        self.dir = onnx_dir
        self.manifest = manifest
        self.model = load_vae_tiny(str(src)).eval()
        self._sessions: dict = {}

    def session(self, component: str):
        import onnxruntime as ort

        if component not in self._sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            self._sessions[component] = ort.InferenceSession(
                str(self.dir / component / "model.onnx"), opts, providers=["CPUExecutionProvider"]
            )
        return self._sessions[component]


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    return _fake_pipeline(tmp_path_factory.mktemp("vae_tiny_pipeline"))


@pytest.fixture(scope="session")
def vae_tiny(pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_tiny")
    src = build_tiny_vae_tiny(pipeline_dir, root / "diffusers", seed=0)
    manifest = export_vae_tiny(str(src), root / "onnx")
    return ExportedVaeTiny(src, root / "onnx", manifest)


def test_tiny_model_fits_the_pipeline_and_is_not_trivial(vae_tiny):
    vae = vae_tiny.model
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor == 1.0
    assert measured_scale_factor(vae) == 2
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ya, yb = vae.decode(a).sample, vae.decode(b).sample
        za = vae.encode(ya.clamp(-1, 1)).latents
    assert 0.2 < float(ya.std()) < 1.0
    assert float((ya - yb).abs().mean()) > 0.1
    assert 0.3 < float(za.std()) < 3.0


def test_seeds_give_different_models(pipeline_dir, tmp_path):
    a = build_tiny_vae_tiny(pipeline_dir, tmp_path / "a", seed=0)
    b = build_tiny_vae_tiny(pipeline_dir, tmp_path / "b", seed=1)
    c = build_tiny_vae_tiny(pipeline_dir, tmp_path / "c", seed=0)
    wa = load_vae_tiny(str(a)).state_dict()
    wb = load_vae_tiny(str(b)).state_dict()
    wc = load_vae_tiny(str(c)).state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_layout_and_manifest(vae_tiny):
    m = vae_tiny.manifest
    assert json.loads((vae_tiny.dir / "tcd_ort.json").read_text()) == m
    assert m["format_version"] == 1
    assert m["kind"] == "vae-tiny"
    assert m["dtype"] == "float32"
    assert m["weights_keep_names"] is True
    assert m["latent_channels"] == 4
    assert m["scaling_factor"] == 1.0
    assert m["scale_factor"] == 2
    assert m["exporter"]["method"] == "torch.onnx.export(dynamo=True, optimize=False)"
    assert m["exporter"]["opset"] == 18
    dec, enc = m["components"]["vae_decoder"], m["components"]["vae_encoder"]
    assert set(m["components"]) == {"vae_decoder", "vae_encoder"}
    assert dec["inputs"] == {
        "latent_sample": {"dtype": "float32", "shape": ["batch", 4, "height", "width"]}
    }
    assert dec["outputs"] == {
        "sample": {"dtype": "float32", "shape": ["batch", 3, "image_height", "image_width"]}
    }
    assert enc["inputs"] == {
        "sample": {"dtype": "float32", "shape": ["batch", 3, "height", "width"]}
    }
    assert enc["outputs"] == {
        "latents": {"dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}
    }
    for part in ("vae_decoder", "vae_encoder"):
        d = vae_tiny.dir / part
        assert {p.name for p in d.iterdir()} == {"model.onnx", "model.onnx_data", "config.json"}
        config = json.loads((d / "config.json").read_text())
        assert config["_class_name"] == "AutoencoderTiny"
        assert config["scaling_factor"] == 1.0
        assert config["latent_channels"] == 4
        assert config["upsampling_scaling_factor"] == 2
        assert config["decoder_block_out_channels"] == [16, 16]
        assert config["encoder_block_out_channels"] == [16, 16]
        assert m["components"][part]["weights_dtype"] == "float32"
        assert m["components"][part]["attention"] == "plain"


def test_initializers_keep_the_module_names(vae_tiny):
    params = dict(vae_tiny.model.named_parameters())
    for part, prefix in (("vae_decoder", "decoder."), ("vae_encoder", "encoder.")):
        names = initializer_names(vae_tiny.dir / part / "model.onnx")
        expected = {n for n in params if n.startswith(prefix)}
        assert expected <= names, sorted(expected - names)[:5]


@pytest.mark.parametrize("batch,h,w", [(1, 8, 8), (2, 12, 20), (2, 7, 5)])
def test_decoder_matches_diffusers(vae_tiny, batch, h, w):
    g = torch.Generator().manual_seed(batch * 100 + h * 10 + w)
    # Some values past TAESD's soft clamp (tanh(x / 3) * 3) too.
    latents = torch.randn(batch, 4, h, w, generator=g) * 2
    with torch.no_grad():
        expected = vae_tiny.model.decode(latents).sample.numpy()
    (got,) = vae_tiny.session("vae_decoder").run(None, {"latent_sample": latents.numpy()})
    assert got.shape == (batch, 3, 2 * h, 2 * w)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # Unclamped: the graph does not clip to [-1, 1] (the engine does).
    assert got.min() < -1 or got.max() > 1


@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (2, 24, 40), (2, 14, 10)])
def test_encoder_matches_diffusers(vae_tiny, batch, h, w):
    g = torch.Generator().manual_seed(batch * 100 + h * 10 + w)
    image = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    with torch.no_grad():
        expected = vae_tiny.model.encode(image).latents.numpy()
    (got,) = vae_tiny.session("vae_encoder").run(None, {"sample": image.numpy()})
    assert got.shape == (batch, 4, h // 2, w // 2)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_fp16_export(vae_tiny, tmp_path):
    import onnxruntime as ort

    m = export_vae_tiny(str(vae_tiny.src), tmp_path / "onnx", dtype="fp16")
    assert m["dtype"] == "float16"
    for part in ("vae_decoder", "vae_encoder"):
        c = m["components"][part]
        assert c["weights_dtype"] == "float16"
        assert {io["dtype"] for io in [*c["inputs"].values(), *c["outputs"].values()]} == {
            "float16"
        }
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae_tiny.model.decode(latents).sample.numpy()
    sess = ort.InferenceSession(
        str(tmp_path / "onnx/vae_decoder/model.onnx"), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {"latent_sample": latents.numpy().astype(np.float16)})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-2)


def test_other_scale_factors_are_refused():
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        upsampling_scaling_factor=4,
    )
    # The decoder upsamples by 4, the encoder's stride-2 convolutions still downsample by 2.
    with pytest.raises(UserError, match="does not invert the decoder's x4 scale"):
        measured_scale_factor(vae)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_refuses_other_sources(pipeline_dir, tmp_path, cli_in_process):
    # A full VAE, the pipeline holding it, and a directory without a config.
    (tmp_path / "empty").mkdir()
    for source, what in (
        (pipeline_dir / "vae", "config.json is the config of AutoencoderKL"),
        (pipeline_dir, "vae/config.json is the config of AutoencoderKL"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "missing", "no such file or directory"),
    ):
        code, err = cli_in_process("vae-tiny", source, tmp_path / "out")
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert what in lines[0] and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_cli_writes_the_layout(vae_tiny, tmp_path, cli_in_process):
    # One real process for the exit status; the refusal runs in this one.
    out = tmp_path / "onnx"
    r = _cli("-q", "vae-tiny", vae_tiny.src, out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "tcd_ort.json").read_text())["components"] == vae_tiny.manifest[
        "components"
    ]
    code, err = cli_in_process("vae-tiny", vae_tiny.src, out)
    assert code == 2 and "--overwrite" in err
