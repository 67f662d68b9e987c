"""ControlNets: the tiny random-weight ControlNetModels, their flat ONNX export (layout,
manifest, names, outputs against PyTorch at several sizes), the chain ControlNet -> UNet
residual inputs, the diffusers reference's ControlNet cases and the CLI's errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.controlnet import (
    ZEROED_BY_FROM_UNET,
    build_tiny_controlnet,
    export_controlnet,
    export_controlnet_model,
)
from export.errors import UserError
from export.onnx_io import initializer_names
from export.reference import Case, load_reference_pipeline, run_case
from export.unet import export_unet, ip_adapter_inputs, plain_inputs

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-4
DOWN = [f"down_block_res_sample_{i}" for i in range(6)]


class ExportedControlNet:
    def __init__(self, family, pipeline, src, onnx_dir, manifest):
        from diffusers import ControlNetModel

        self.family = family  # the tiny pipeline's family
        self.pipeline = pipeline
        self.src = src
        self.dir = onnx_dir
        self.manifest = manifest
        self.model = ControlNetModel.from_pretrained(src, torch_dtype=torch.float32).eval()
        self._session = None

    @property
    def session(self):
        import onnxruntime as ort

        if self._session is None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            self._session = ort.InferenceSession(
                str(self.dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
            )
        return self._session


def _controlnet(tmp_path_factory, exported, seed=0):
    root = tmp_path_factory.mktemp(f"controlnet_{exported.family}")
    src = build_tiny_controlnet(exported.src, root / "diffusers", seed=seed)
    manifest = export_controlnet(str(src), root / "onnx")
    return ExportedControlNet(exported.family, exported, src, root / "onnx", manifest)


@pytest.fixture(scope="session")
def sd15_controlnet(sd15, tmp_path_factory):
    return _controlnet(tmp_path_factory, sd15)


@pytest.fixture(scope="session")
def sdxl_controlnet(sdxl, tmp_path_factory):
    return _controlnet(tmp_path_factory, sdxl)


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def controlnet(request):
    return request.getfixturevalue(f"{request.param}_controlnet")


def _inputs(cn, b, h, w, seed=0):
    """ControlNet inputs (torch) at latent size h x w; the control image is 2x that (the tiny
    VAE's scale factor)."""
    g = torch.Generator().manual_seed(seed + h * w)
    cfg = cn.model.config
    feeds = {
        "sample": torch.randn(b, 4, h, w, generator=g),
        "timestep": torch.tensor([999.0, 499.0][:b]),
        "encoder_hidden_states": torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
        "controlnet_cond": torch.rand(b, 3, 2 * h, 2 * w, generator=g),
    }
    if cn.family == "sdxl":
        feeds["text_embeds"] = torch.randn(b, 32, generator=g)
        feeds["time_ids"] = torch.tensor([[h * 2.0, w * 2.0, 0.0, 0.0, h * 2.0, w * 2.0]] * b)
    return feeds


def _torch_controlnet(cn, feeds, scale=1.0):
    added = None
    if "text_embeds" in feeds:
        added = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}
    with torch.no_grad():
        down, mid = cn.model(
            feeds["sample"],
            feeds["timestep"],
            feeds["encoder_hidden_states"],
            feeds["controlnet_cond"],
            conditioning_scale=scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
    return list(down), mid


def test_layout_and_manifest(controlnet):
    d = controlnet.dir
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "model.onnx", "model.onnx_data", "tcd_ort.json"
    ]
    m = json.loads((d / "tcd_ort.json").read_text())
    assert m == controlnet.manifest
    sdxl = controlnet.family == "sdxl"
    assert m["format_version"] == 1 and m["kind"] == "controlnet"
    assert m["family"] == ("sdxl" if sdxl else "sd")
    assert m["dtype"] == "float32" and m["weights_keep_names"] is True
    assert m["exporter"]["name"] == "tcd-ort-export" and m["exporter"]["opset"] == 18
    assert list(m["components"]) == ["controlnet"]
    io = m["components"]["controlnet"]
    extra = ["text_embeds", "time_ids"] if sdxl else []
    assert list(io["inputs"]) == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond", *extra
    ]
    f32 = "float32"
    assert io["inputs"]["sample"] == {"dtype": f32, "shape": ["batch", 4, "height", "width"]}
    assert io["inputs"]["timestep"] == {"dtype": f32, "shape": ["batch"]}
    assert io["inputs"]["encoder_hidden_states"]["shape"] == [
        "batch", "sequence", 64 if sdxl else 32
    ]
    assert io["inputs"]["controlnet_cond"] == {
        "dtype": f32, "shape": ["batch", 3, "image_height", "image_width"]
    }
    if sdxl:
        assert io["inputs"]["text_embeds"]["shape"] == ["batch", 32]
        assert io["inputs"]["time_ids"]["shape"] == ["batch", 6]
    assert list(io["outputs"]) == [*DOWN, "mid_block_res_sample"]
    assert io["outputs"]["down_block_res_sample_0"]["shape"] == ["batch", 32, "height", "width"]
    assert io["outputs"]["down_block_res_sample_3"]["shape"] == [
        "batch", 32, "height_1", "width_1"
    ]
    assert io["outputs"]["mid_block_res_sample"] == {
        "dtype": f32, "shape": ["batch", 64, "height_1", "width_1"]
    }
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel"
    assert cfg["addition_embed_type"] == ("text_time" if sdxl else None)
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False)
    locations = {
        e.value
        for init in graph.graph.initializer
        for e in init.external_data
        if e.key == "location"
    }
    assert locations == {"model.onnx_data"}


def test_initializers_keep_parameter_names(controlnet):
    inits = initializer_names(controlnet.dir / "model.onnx")
    names = [n for n, _ in controlnet.model.named_parameters()]
    missing = [n for n in names if n not in inits]
    assert names and not missing, missing[:5]
    assert "controlnet_down_blocks.0.weight" in inits
    assert "controlnet_cond_embedding.conv_in.weight" in inits


# The UNet residual tests' sizes; the odd latent height makes the downsampled ones ceil(h / 2).
@pytest.mark.parametrize("b,h,w", [(1, 16, 16), (2, 24, 40), (1, 7, 10)])
def test_matches_torch(controlnet, b, h, w):
    feeds = _inputs(controlnet, b, h, w)
    got = controlnet.session.run(None, {k: v.numpy() for k, v in feeds.items()})
    down, mid = _torch_controlnet(controlnet, feeds)
    assert len(got) == len(down) + 1
    for name, a, r in zip([*DOWN, "mid"], got, [*down, mid], strict=True):
        assert a.shape == tuple(r.shape), name
        assert float(r.abs().mean()) > 1e-2, name  # from_unet's zeros were re-initialised
        assert float(np.abs(a - r.numpy()).max()) <= TOL, name


def test_residuals_drive_the_unet(sd15_controlnet):
    """The chain the engine runs: ONNX ControlNet outputs, scaled, into the ONNX UNet's
    residual inputs, against diffusers' ControlNetModel(conditioning_scale) -> UNet."""
    cn, exported = sd15_controlnet, sd15_controlnet.pipeline
    b, h, w, scale = 2, 12, 20, 0.7
    feeds = _inputs(cn, b, h, w, seed=1)
    outs = cn.session.run(None, {k: v.numpy() for k, v in feeds.items()})
    unet_feeds = {k: feeds[k].numpy() for k in ("sample", "timestep", "encoder_hidden_states")}
    for i, r in enumerate(outs[:-1]):
        unet_feeds[f"down_block_additional_residual_{i}"] = r * np.float32(scale)
    unet_feeds["mid_block_additional_residual"] = outs[-1] * np.float32(scale)
    unet_feeds.update({k: v.numpy() for k, v in ip_adapter_inputs(exported.pipe.unet, b).items()})
    got = exported.session("unet").run(None, unet_feeds)[0]
    down, mid = _torch_controlnet(cn, feeds, scale)
    args = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
    with torch.no_grad():
        ref = exported.pipe.unet(
            *args, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        plain = exported.pipe.unet(*args).sample
    assert float((ref - plain).abs().max()) > 1e-2
    assert float(np.abs(got - ref.numpy()).max()) <= TOL


def test_tiny_controlnet_seeds(sd15, sd15_controlnet, tmp_path):
    from diffusers import ControlNetModel

    a = dict(sd15_controlnet.model.named_parameters())
    other = build_tiny_controlnet(sd15.src, tmp_path / "seed1", seed=1)
    b = dict(ControlNetModel.from_pretrained(other, torch_dtype=torch.float32).named_parameters())
    zeroed = ZEROED_BY_FROM_UNET
    for name, p in a.items():
        if name.startswith(zeroed):
            assert torch.count_nonzero(p) == p.numel(), name
            assert not torch.equal(p, b[name]), name
    # The encoder is the pipeline's UNet's, as from_unet copies it.
    unet = dict(sd15.pipe.unet.named_parameters())
    assert torch.equal(a["down_blocks.1.attentions.0.proj_in.weight"],
                       unet["down_blocks.1.attentions.0.proj_in.weight"])
    # The conditioning embedding downsamples by the tiny VAE's scale factor, 2.
    assert list(sd15_controlnet.model.config.conditioning_embedding_out_channels) == [16, 32]


def _control_image(path, width, height):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    lines = ((x + 2 * y) % 9 < 2) | ((x - y) % 13 == 0)
    Image.fromarray(np.where(lines, 255, 0).astype(np.uint8)).convert("RGB").save(path)


def test_reference_controlnet_cases(sd15_controlnet, tmp_path):
    cn = sd15_controlnet
    _control_image(tmp_path / "lines.png", 40, 24)
    pipe = load_reference_pipeline(str(cn.pipeline.src))
    common = dict(prompt="a cat", steps=4, eta=0.3, seed=5, width=32, height=16)
    plain = run_case(pipe, Case(**common, guidance=2.0))

    def control(scale, **kw):
        case = Case(**common, controlnets=[{"path": str(cn.src), "scale": scale}],
                    control_images=["lines.png"], **kw)
        case.validate("test")
        return run_case(pipe, case, tmp_path, tmp_path)

    with_cn = control(1.0, guidance=2.0, num_images=2)
    # The ControlNet moves the result by much more than rounding.
    rel = np.abs(with_cn.latents[:1] - plain.latents).max() / np.abs(plain.latents).max()
    assert rel > 1e-2
    inter = with_cn.intermediates
    assert inter["control_image_0"].shape == (2, 3, 16, 32)  # resized from 40x24, no CFG copy
    assert 0.0 <= inter["control_image_0"].min() and inter["control_image_0"].max() <= 1.0
    assert inter["control_scales"].tolist() == [[1.0]] * 4
    # First step, guidance batch (2 images x 2): the residuals the UNet got.
    assert inter["control_down_0"].shape == (4, 32, 8, 16)
    assert inter["control_mid"].shape == (4, 64, 4, 8)
    # A window leaves steps without the ControlNet; scale 0 is the plain pipeline.
    windowed = control(0.5, guidance=2.0, control_start=[0.25], control_end=[0.75])
    assert windowed.intermediates["control_scales"][:, 0].tolist() == [0.0, 0.5, 0.5, 0.0]
    zero = control(0.0, guidance=2.0)
    assert np.allclose(zero.latents, plain.latents, atol=1e-5)


def test_reference_multi_controlnet_and_canny(sd15_controlnet, tmp_path):
    cn = sd15_controlnet
    other = build_tiny_controlnet(cn.pipeline.src, tmp_path / "cn1", seed=1)
    _control_image(tmp_path / "lines.png", 32, 16)
    pipe = load_reference_pipeline(str(cn.pipeline.src))
    case = Case(prompt="a cat", steps=2, eta=0.3, seed=5, width=32, height=16, guidance=0.0,
                controlnets=[
                    {"path": str(cn.src), "scale": 0.5}, {"path": str(other), "scale": 1.0}
                ],
                control_images=["lines.png", "lines.png"], control_end=[0.5, 1.0],
                control_preprocess="canny")
    case.validate("test")
    result = run_case(pipe, case, tmp_path, tmp_path)
    assert result.intermediates["control_scales"].tolist() == [[0.5, 1.0], [0.0, 1.0]]
    edges = np.asarray(result.control_images[0])
    assert edges.shape == (16, 32, 3) and set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all() and edges.any()
    assert result.intermediates["control_down_0"].shape == (1, 32, 8, 16)


def test_reference_refuses_other_family(sd15, sdxl_controlnet, tmp_path):
    _control_image(tmp_path / "lines.png", 32, 16)
    pipe = load_reference_pipeline(str(sd15.src))
    case = Case(prompt="a", width=32, height=16, controlnets=[{"path": str(sdxl_controlnet.src)}],
                control_images=["lines.png"])
    with pytest.raises(UserError, match="SDXL ControlNet"):
        run_case(pipe, case, tmp_path, tmp_path)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"controlnets": [{"path": "c"}]}, "one image path per controlnet"),
        ({"controlnets": [{"path": "c"}], "control_images": ["a", "b"]}, "one image path"),
        ({"controlnets": [], "control_images": []}, "non-empty"),
        ({"controlnets": [{"path": "c", "weight": 1}], "control_images": ["a"]}, "unknown"),
        ({"controlnets": [{"path": "c"}], "control_images": ["a"], "image": "i.png"},
         "text-to-image only"),
        ({"controlnets": [{"path": "c"}], "control_images": ["a"], "control_start": [0.5],
          "control_end": [0.5]}, "below"),
        ({"controlnets": [{"path": "c"}], "control_images": ["a"], "control_end": [0.5, 1.0]},
         "one number per controlnet"),
        ({"controlnets": [{"path": "c"}], "control_images": ["a"], "control_preprocess": "depth"},
         "canny"),
        ({"control_images": ["a"]}, "needs controlnets"),
    ],
)
def test_reference_controlnet_case_checks(fields, message):
    with pytest.raises(UserError, match=message):
        Case.from_json({"name": "x", "prompt": "p", **fields}, 0)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_errors(sd15, tmp_path, cli_in_process):
    out = tmp_path / "out"
    cases = [
        (["controlnet", "/nonexistent/controlnet", out], "no such file or directory"),
        # A pipeline directory (no ControlNet in it) and a UNet directory are not ControlNets.
        (["controlnet", sd15.src, out], "not a diffusers ControlNetModel directory"),
        (["controlnet", sd15.src / "unet", out], "UNet2DConditionModel, not of ControlNetModel"),
        (["tiny-controlnet", "--unet", tmp_path, out], "not a diffusers pipeline directory"),
        (["tiny-controlnet", out], "--unet"),
    ]
    for args, needle in cases:
        code, stderr = cli_in_process(*args)
        assert code == 2, (args, stderr)
        assert needle in stderr, (args, stderr)
        assert not out.exists()


def test_cli_tiny_controlnet_and_export(sd15, tmp_path):
    src, dst = tmp_path / "cn", tmp_path / "onnx"
    r = _cli("-q", "tiny-controlnet", "--unet", sd15.src, src, "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (src / "config.json").is_file()
    assert (src / "diffusion_pytorch_model.safetensors").is_file()
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    r = _cli("controlnet", src, dst)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (dst / "keep.txt").exists()
    r = _cli("-q", "controlnet", src, dst, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "tcd_ort.json").read_text())["kind"] == "controlnet"


def test_real_layout_unet_and_controlnet(tmp_path):
    """SD1.5's block layout (4 down blocks, 3 downsamplers, 12 + 1 residuals) and ControlNet
    conditioning (control image 8x the latents) at small widths: 64x64 and 48x80 images, whose
    6x10 latents go 6x10 -> 3x5 -> 2x3 -> 1x2, every level a ceil(n / 2)."""
    import onnxruntime as ort
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()  # diffusers' default embedding: 8x
    with torch.no_grad():
        for p in controlnet.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape) * 0.1)
    export_unet(unet, tmp_path / "unet", 18)
    export_controlnet_model(controlnet, tmp_path / "controlnet", 18)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    cpu = ["CPUExecutionProvider"]
    u = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"), opts, providers=cpu)
    c = ort.InferenceSession(str(tmp_path / "controlnet" / "model.onnx"), opts, providers=cpu)
    shapes = {i.name: i.shape for i in u.get_inputs()}
    # 16 cross-attention layers (SD1.5's), each with an IP-Adapter key and value, and the scales.
    assert len(shapes) == 3 + 12 + 1 + 2 * 16 + 1
    assert shapes["ip_adapter_scale"] == [16]
    assert shapes["down_block_additional_residual_11"] == ["batch", 64, "height_3", "width_3"]
    assert [o.name for o in c.get_outputs()] == [
        *(f"down_block_res_sample_{i}" for i in range(12)), "mid_block_res_sample"
    ]
    for width, height in ((64, 64), (48, 80)):
        h, w = height // 8, width // 8
        g = torch.Generator().manual_seed(h)
        feeds = {
            "sample": torch.randn(1, 4, h, w, generator=g),
            "timestep": torch.tensor([499.0]),
            "encoder_hidden_states": torch.randn(1, 77, 32, generator=g),
        }
        cond = torch.rand(1, 3, height, width, generator=g)
        outs = c.run(None, {**{k: v.numpy() for k, v in feeds.items()},
                            "controlnet_cond": cond.numpy()})
        with torch.no_grad():
            down, mid = controlnet(*feeds.values(), cond, return_dict=False)
            ref = unet(*feeds.values(), down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
            plain = unet(*feeds.values()).sample
        for a, r in zip(outs, [*down, mid], strict=True):
            assert a.shape == tuple(r.shape)
            assert float(np.abs(a - r.numpy()).max()) <= TOL
        names = [i.name for i in u.get_inputs()][3 : 3 + len(outs)]
        unet_feeds = {k: v.numpy() for k, v in feeds.items()}
        unet_feeds.update({k: v.numpy() for k, v in ip_adapter_inputs(unet, 1).items()})
        got = u.run(None, {**unet_feeds, **dict(zip(names, outs, strict=True))})[0]
        assert float(np.abs(got - ref.numpy()).max()) <= TOL
        zeros = {k: v.numpy() for k, v in plain_inputs(unet, 1, h, w).items()}
        got0 = u.run(None, {**unet_feeds, **zeros})[0]
        assert float(np.abs(got0 - plain.numpy()).max()) <= TOL
        assert float((ref - plain).abs().max()) > 1e-2
