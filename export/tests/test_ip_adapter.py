"""IP-Adapters (issue #20): the tiny random-weight adapters, their export (layout, manifest,
initializer names), both graphs against what diffusers computes after `load_ip_adapter` on the
tiny SD1.5 and SDXL pipelines, and the refused inputs.

The reference numbers come from diffusers itself: `pipe.load_ip_adapter` converts the tiny
adapter's original-layout weights, and each attn2 processor's `to_k_ip[0]` / `to_v_ip[0]` is
applied to `unet.encoder_hid_proj.image_projection_layers[0]` of the encoder's output.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.errors import UserError
from export.ip_adapter import export_ip_adapter, load_image_processor, read_weights
from export.onnx_io import initializer_names
from export.tests.conftest import REUSE
from export.tiny import build_tiny
from export.tiny_ip_adapter import (
    TINY_SUBFOLDER,
    TINY_VISION_CONFIG,
    TINY_WEIGHT_NAMES,
    build_tiny_ip_adapter,
)

TOL = 1e-5
SIZE = TINY_VISION_CONFIG["image_size"]
PATCHES = (SIZE // TINY_VISION_CONFIG["patch_size"]) ** 2
CASES = [("sd15", "plain"), ("sd15", "plus"), ("sdxl", "plain"), ("sdxl", "plus")]


def _session(path: pathlib.Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The tiny pipelines by family, built on first use (or the parity fixtures' under
    TCD_ORT_REUSE_EXPORTS)."""
    made: dict[str, pathlib.Path] = {}

    def get(family: str) -> pathlib.Path:
        if family not in made:
            reused = pathlib.Path(REUSE or "/nonexistent") / family / "diffusers"
            if (reused / "model_index.json").is_file():
                made[family] = reused
            else:
                root = tmp_path_factory.mktemp(f"ip_pipeline_{family}")
                made[family] = build_tiny(family, root / "diffusers", seed=0)
        return made[family]

    return get


class ExportedAdapter:
    def __init__(self, family, variant, pipeline_dir, src, out, manifest):
        self.family = family
        self.variant = variant
        self.pipeline_dir = pipeline_dir
        self.src = src
        self.dir = out
        self.manifest = manifest
        self.weight_name = TINY_WEIGHT_NAMES[variant]
        self._pipe = None
        self._sessions: dict = {}

    @property
    def pipe(self):
        """The tiny pipeline with this adapter loaded by diffusers' own `load_ip_adapter`."""
        from diffusers import DiffusionPipeline

        if self._pipe is None:
            pipe = DiffusionPipeline.from_pretrained(self.pipeline_dir, dtype=torch.float32)
            pipe.load_ip_adapter(
                str(self.src), subfolder=TINY_SUBFOLDER, weight_name=self.weight_name
            )
            self._pipe = pipe
        return self._pipe

    def session(self, component: str):
        if component not in self._sessions:
            self._sessions[component] = _session(self.dir / component / "model.onnx")
        return self._sessions[component]

    def ip_processors(self):
        """The UNet's IP-Adapter processors (its attn2 layers), in `attn_processors` order.

        Once loaded, a plus adapter's Resampler (`encoder_hid_proj`) is part of the UNet and its
        attention shows up in `attn_processors` too; diffusers numbers the layers before that."""
        procs = self.pipe.unet.attn_processors
        return [
            p
            for name, p in procs.items()
            if not name.endswith("attn1.processor") and not name.startswith("encoder_hid_proj.")
        ]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What diffusers' `encode_image` takes from the encoder for this variant."""
        with torch.no_grad():
            out = self.pipe.image_encoder(pixel_values, output_hidden_states=True)
        return out.image_embeds if self.variant == "plain" else out.hidden_states[-2]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def adapter(request, pipelines, tmp_path_factory) -> ExportedAdapter:
    family, variant = request.param
    pipeline_dir = pipelines(family)
    root = tmp_path_factory.mktemp(f"ip_{family}_{variant}")
    src = build_tiny_ip_adapter(pipeline_dir, root / "source", variant, seed=0)
    manifest = export_ip_adapter(
        str(src), root / "onnx", subfolder=TINY_SUBFOLDER, weight_name=TINY_WEIGHT_NAMES[variant]
    )
    return ExportedAdapter(family, variant, pipeline_dir, src, root / "onnx", manifest)


def test_tiny_source_is_in_the_original_layout(adapter):
    weights = load_file(str(adapter.src / TINY_SUBFOLDER / adapter.weight_name))
    assert {k.split(".")[0] for k in weights} == {"image_proj", "ip_adapter"}
    layers = len(adapter.ip_processors())
    assert sorted(k for k in weights if k.startswith("ip_adapter.")) == sorted(
        f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(layers) for kv in "kv"
    )
    if adapter.variant == "plain":
        assert sorted(k for k in weights if k.startswith("image_proj.")) == [
            "image_proj.norm.bias",
            "image_proj.norm.weight",
            "image_proj.proj.bias",
            "image_proj.proj.weight",
        ]
    else:
        # The original Resampler's names, which diffusers' converter renames.
        for key in (
            "image_proj.latents",
            "image_proj.proj_in.weight",
            "image_proj.layers.0.0.to_q.weight",
            "image_proj.layers.0.0.to_kv.weight",
            "image_proj.layers.0.0.to_out.weight",
            "image_proj.layers.0.0.norm1.weight",
            "image_proj.layers.3.1.3.weight",
        ):
            assert key in weights, key
        assert not any(".attn." in k or ".ln0." in k for k in weights)
    encoder = json.loads(
        (adapter.src / TINY_SUBFOLDER / "image_encoder" / "config.json").read_text()
    )
    assert encoder["model_type"] == "clip_vision_model"
    assert not (
        adapter.src / TINY_SUBFOLDER / "image_encoder" / "preprocessor_config.json"
    ).exists()


def test_layout_and_manifest(adapter):
    d = adapter.dir
    assert sorted(p.name for p in d.iterdir()) == [
        "image_encoder",
        "image_projection",
        "tcd_ort.json",
    ]
    assert sorted(p.name for p in (d / "image_encoder").iterdir()) == [
        "config.json",
        "model.onnx",
        "model.onnx_data",
        "preprocessor_config.json",
    ]
    assert sorted(p.name for p in (d / "image_projection").iterdir()) == [
        "model.onnx",
        "model.onnx_data",
    ]
    m = json.loads((d / "tcd_ort.json").read_text())
    assert m == adapter.manifest
    unet = adapter.pipe.unet
    procs = adapter.ip_processors()
    plain = adapter.variant == "plain"
    assert m["format_version"] == 1 and m["kind"] == "ip-adapter"
    assert m["variant"] == adapter.variant
    # The tiny UNets' widths (32, 64) are none of 768 / 1024 / 2048.
    assert m["family"] == "sd"
    assert m["dtype"] == "float32" and m["weights_keep_names"] is True
    assert m["cross_attention_dim"] == unet.config.cross_attention_dim
    assert m["tokens"] == (4 if plain else 16)
    assert m["tokens"] == procs[0].num_tokens[0]
    assert m["layers"] == [p.to_k_ip[0].out_features for p in procs]
    assert m["layers"] == [p.hidden_size for p in procs]
    # SD1.5-tiny: down_blocks.1 2, mid 1, up_blocks.0 3; SDXL-tiny: two transformer layers each.
    assert len(m["layers"]) == (6 if adapter.family == "sd15" else 12)
    output = "image_embeds" if plain else "image_hidden_states"
    assert m["image_encoder_output"] == output
    assert m["exporter"]["name"] == "tcd-ort-export" and m["exporter"]["opset"] == 18
    enc = m["components"]["image_encoder"]
    f32 = "float32"
    assert enc["inputs"] == {"pixel_values": {"dtype": f32, "shape": ["batch", 3, SIZE, SIZE]}}
    shape = ["batch", 32] if plain else ["batch", PATCHES + 1, 32]
    assert enc["outputs"] == {output: {"dtype": f32, "shape": shape}}
    proj = m["components"]["image_projection"]
    assert proj["inputs"] == {output: {"dtype": f32, "shape": shape}}
    names = [n for i in range(len(procs)) for n in (f"ip_key_{i}", f"ip_value_{i}")]
    assert list(proj["outputs"]) == names
    for i, hidden in enumerate(m["layers"]):
        for name in (f"ip_key_{i}", f"ip_value_{i}"):
            assert proj["outputs"][name] == {
                "dtype": f32,
                "shape": ["batch", m["tokens"], hidden],
            }
    # The Resampler's attention is fused like the UNet's; CLIP's is transformers', not diffusers'.
    assert enc["attention"] == "plain"
    assert proj["attention"] == ("plain" if plain else "fused")


def test_configs_are_the_ones_diffusers_loads(adapter, tmp_path):
    """preprocessor_config.json is the CLIPImageProcessor `load_ip_adapter` registers (the
    source has none), config.json the encoder's config as diffusers loads it."""
    saved = json.loads((adapter.dir / "image_encoder" / "preprocessor_config.json").read_text())
    adapter.pipe.feature_extractor.save_pretrained(tmp_path / "theirs")
    assert saved == json.loads((tmp_path / "theirs" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": SIZE}
    assert saved["crop_size"] == {"height": SIZE, "width": SIZE}
    config = json.loads((adapter.dir / "image_encoder" / "config.json").read_text())
    adapter.pipe.image_encoder.config.save_pretrained(tmp_path / "theirs")
    assert config == json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert config["image_size"] == SIZE


def test_initializer_names(adapter):
    enc = initializer_names(adapter.dir / "image_encoder" / "model.onnx")
    params = {n for n, _ in adapter.pipe.image_encoder.named_parameters()}
    assert enc - {"vision_model.embeddings.position_ids"} <= params
    if adapter.variant == "plus":
        # hidden_states[-2]: the last layer and the pooled head are not in the graph.
        last = TINY_VISION_CONFIG["num_hidden_layers"] - 1
        assert not {n for n in enc if f"layers.{last}." in n or "post_layernorm" in n}
        assert "visual_projection.weight" not in enc
    else:
        assert "visual_projection.weight" in enc
    proj = initializer_names(adapter.dir / "image_projection" / "model.onnx")
    image_proj = adapter.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    expected = {f"image_proj.{n}" for n, _ in image_proj.named_parameters()}
    for i in range(len(adapter.manifest["layers"])):
        expected |= {
            f"ip_adapter.{2 * i + 1}.to_k_ip.weight",
            f"ip_adapter.{2 * i + 1}.to_v_ip.weight",
        }
    assert proj == expected


def test_image_encoder_matches_transformers(adapter):
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    expected = adapter.encode(pixel_values).numpy()
    (actual,) = adapter.session("image_encoder").run(None, {"pixel_values": pixel_values.numpy()})
    assert actual.shape == expected.shape
    # Different images must give different features, or the comparison says little.
    assert float(np.abs(expected[0] - expected[1]).max()) > 0.1
    assert float(np.abs(actual - expected).max()) <= TOL
    # The unconditional input of plus adapters: the encoder on an all-zero image.
    zeros = torch.zeros(1, 3, SIZE, SIZE)
    (actual0,) = adapter.session("image_encoder").run(None, {"pixel_values": zeros.numpy()})
    assert float(np.abs(actual0 - adapter.encode(zeros).numpy()).max()) <= TOL


def _diffusers_keys_values(adapter, features: torch.Tensor) -> list[torch.Tensor]:
    unet = adapter.pipe.unet
    with torch.no_grad():
        tokens = unet.encoder_hid_proj.image_projection_layers[0](features)
        out = []
        for proc in adapter.ip_processors():
            out += [proc.to_k_ip[0](tokens), proc.to_v_ip[0](tokens)]
    return out


def test_image_projection_matches_diffusers(adapter):
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    session = adapter.session("image_projection")
    name = adapter.manifest["image_encoder_output"]
    # The encoder's real output at batch 3, and zeros (plain adapters' unconditional input).
    features = adapter.encode(images)
    for x in (features, torch.zeros_like(features[:1])):
        expected = _diffusers_keys_values(adapter, x)
        actual = session.run(None, {name: x.numpy()})
        assert len(actual) == 2 * len(adapter.manifest["layers"])
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == tuple(e.shape)
            assert float(np.abs(a - e.numpy()).max()) <= TOL
    keys = session.run(None, {name: features.numpy()})[0]
    assert float(np.abs(keys[0] - keys[1]).max()) > 0.1


def test_adapter_moves_the_unet(adapter):
    """The tiny adapter's weights are large enough to change the UNet's prediction."""
    pipe = adapter.pipe
    unet = pipe.unet
    g = torch.Generator().manual_seed(3)
    features = adapter.encode(torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    added = {"image_embeds": [features[:, None]]}
    if adapter.family == "sdxl":
        added |= {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.ones(1, 6)}
    out = {}
    try:
        for scale in (0.0, 1.0):
            pipe.set_ip_adapter_scale(scale)
            with torch.no_grad():
                out[scale] = unet(sample, 500, context, added_cond_kwargs=added).sample
    finally:
        pipe.set_ip_adapter_scale(1.0)
    moved = float((out[1.0] - out[0.0]).abs().max())
    assert moved > 0.05 * float(out[0.0].abs().max())


def test_tiny_seeds_differ(pipelines, tmp_path):
    a = build_tiny_ip_adapter(pipelines("sd15"), tmp_path / "a", "plain", seed=0)
    b = build_tiny_ip_adapter(pipelines("sd15"), tmp_path / "b", "plain", seed=1)
    c = build_tiny_ip_adapter(pipelines("sd15"), tmp_path / "c", "plain", seed=0)
    wa, wb, wc = (
        load_file(str(p / TINY_SUBFOLDER / TINY_WEIGHT_NAMES["plain"])) for p in (a, b, c)
    )
    assert not torch.equal(wa["image_proj.proj.weight"], wb["image_proj.proj.weight"])
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


# Refused inputs. A stub source: the weights file and an image encoder directory whose
# config.json is never read before the weights are refused.


def _stub_source(root: pathlib.Path, tensors: dict[str, torch.Tensor], name: str = "w.safetensors"):
    models = root / "models"
    (models / "image_encoder").mkdir(parents=True)
    (models / "image_encoder" / "config.json").write_text("{}")
    save_file(tensors, str(models / name))
    return root


def _export(src, out, **kw):
    return export_ip_adapter(
        str(src), out, weight_name=kw.pop("weight_name", "w.safetensors"), **kw
    )


def test_missing_weights_file(tmp_path):
    src = _stub_source(tmp_path / "src", {"image_proj.proj.weight": torch.zeros(4, 4)})
    with pytest.raises(
        UserError, match=r"no IP-Adapter weights at .*models/nope\.safetensors"
    ) as e:
        _export(src, tmp_path / "out", weight_name="nope.safetensors")
    assert "weights there: w.safetensors" in str(e.value)
    with pytest.raises(UserError, match=r"no IP-Adapter weights at .*sdxl_models/w\.safetensors"):
        _export(src, tmp_path / "out", subfolder="sdxl_models")


def test_missing_image_encoder(tmp_path):
    src = _stub_source(tmp_path / "src", {"image_proj.proj.weight": torch.zeros(4, 4)})
    shutil.rmtree(src / "models" / "image_encoder")
    where = src / "models" / "image_encoder"
    with pytest.raises(UserError, match=f"no CLIP image encoder at {where}"):
        _export(src, tmp_path / "out")
    with pytest.raises(UserError, match=f"no CLIP image encoder at {src / 'elsewhere' / 'enc'}"):
        _export(src, tmp_path / "out", image_encoder_folder="elsewhere/enc")


def test_not_an_ip_adapter(tmp_path):
    src = _stub_source(tmp_path / "src", {"unet.conv_in.weight": torch.zeros(4, 4)})
    with pytest.raises(UserError, match="no image_proj and ip_adapter weights"):
        _export(src, tmp_path / "out")
    src2 = _stub_source(tmp_path / "src2", {"image_proj.proj.weight": torch.zeros(4, 4)})
    with pytest.raises(UserError, match="no ip_adapter weights"):
        _export(src2, tmp_path / "out")
    models = tmp_path / "src3" / "models"
    (models / "image_encoder").mkdir(parents=True)
    (models / "image_encoder" / "config.json").write_text("{}")
    torch.save({"state_dict": {"a": torch.zeros(1)}}, models / "w.bin")
    with pytest.raises(UserError, match="no image_proj and ip_adapter weights"):
        _export(tmp_path / "src3", tmp_path / "out", weight_name="w.bin")
    (models / "w.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="must be .safetensors or .bin"):
        _export(tmp_path / "src3", tmp_path / "out", weight_name="w.ckpt")


KV = {
    "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 4),
    "ip_adapter.1.to_v_ip.weight": torch.zeros(8, 4),
}


@pytest.mark.parametrize(
    ("image_proj", "message"),
    [
        (["proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.3.weight"], "Full Face"),
        (["perceiver_resampler.proj_in.weight", "proj.0.weight", "norm.weight"], "FaceID Plus"),
        (
            ["proj.0.weight", "proj.2.weight", "norm.weight", "norm.bias"],
            r"FaceID \(ip-adapter-faceid",
        ),
        (["something.weight"], "unknown IP-Adapter image projection"),
    ],
)
def test_unsupported_kinds(tmp_path, image_proj, message):
    tensors = {f"image_proj.{k}": torch.zeros(4, 4) for k in image_proj}
    src = _stub_source(tmp_path / "src", {**tensors, **KV})
    with pytest.raises(UserError, match=message):
        _export(src, tmp_path / "out")


def test_faceid_lora_and_gaps_in_the_layers(tmp_path):
    proj = {"image_proj.proj.weight": torch.zeros(16, 8), "image_proj.norm.weight": torch.ones(4)}
    lora = {**proj, **KV, "ip_adapter.1.to_k_lora.down.weight": torch.zeros(2, 4)}
    with pytest.raises(UserError, match="LoRA layers"):
        _export(_stub_source(tmp_path / "a", lora), tmp_path / "out")
    gap = {**proj, **KV, "ip_adapter.5.to_k_ip.weight": torch.zeros(8, 4)}
    with pytest.raises(UserError, match=r"layer ids \[1, 5\]"):
        _export(_stub_source(tmp_path / "b", gap), tmp_path / "out")


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        _export(tmp_path / "missing", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_refuses_an_encoder_of_another_width(adapter, tmp_path):
    """A plain adapter's projection takes the encoder's image_embeds, a plus one its hidden
    states: an encoder of other widths is refused, naming --image-encoder-folder."""
    if adapter.family != "sd15":
        pytest.skip("one family is enough")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    src = tmp_path / "src"
    shutil.copytree(adapter.src, src)
    other = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**{**TINY_VISION_CONFIG, "hidden_size": 16, "projection_dim": 16})
    )
    other.save_pretrained(src / "other_encoder")
    with pytest.raises(UserError, match="--image-encoder-folder"):
        export_ip_adapter(
            str(src),
            tmp_path / "out",
            weight_name=adapter.weight_name,
            image_encoder_folder="other_encoder/",
        )


def test_bin_weights_read_like_safetensors(adapter, tmp_path):
    """A .bin of nested dicts (the h94 .bin layout) reads the same as the .safetensors."""
    weights = read_weights(adapter.src / TINY_SUBFOLDER / adapter.weight_name)
    nested = {"image_proj": weights.image_proj, "ip_adapter": weights.ip_adapter}
    torch.save(nested, tmp_path / "w.bin")
    again = read_weights(tmp_path / "w.bin")
    assert again.image_proj.keys() == weights.image_proj.keys()
    assert all(torch.equal(again.ip_adapter[k], v) for k, v in weights.ip_adapter.items())


def test_preprocessor_from_the_source(tmp_path):
    from export.ip_adapter import image_processor_class

    cls = image_processor_class()
    cls(size=SIZE, crop_size=SIZE, image_mean=[0.5, 0.5, 0.5]).save_pretrained(tmp_path / "a")
    assert list(load_image_processor(tmp_path / "a", SIZE).image_mean) == [0.5, 0.5, 0.5]
    cls(size=2 * SIZE, crop_size=2 * SIZE).save_pretrained(tmp_path / "b")
    with pytest.raises(UserError, match=f"center-crop every image to the encoder's {SIZE}x{SIZE}"):
        load_image_processor(tmp_path / "b", SIZE)
    # None beside the encoder: diffusers' CLIPImageProcessor(size=S, crop_size=S).
    made = load_image_processor(tmp_path / "none", SIZE)
    assert made.crop_size.get("height") == SIZE


def test_cli(pipelines, tmp_path, cli_in_process):
    pipeline = pipelines("sd15")
    code, err = cli_in_process(
        "-q", "tiny-ip-adapter", "--unet", pipeline, "--variant", "plus", tmp_path / "src"
    )
    assert code == 0, err
    assert (tmp_path / "src" / "models" / "ip-adapter-plus.safetensors").is_file()
    assert (tmp_path / "src" / "models" / "image_encoder" / "config.json").is_file()
    code, err = cli_in_process("-q", "tiny-ip-adapter", "--unet", pipeline, tmp_path / "src")
    assert code == 2 and "--overwrite" in err
    code, err = cli_in_process("-q", "tiny-ip-adapter", "--unet", tmp_path, tmp_path / "src2")
    assert code == 2 and "not a diffusers pipeline directory" in err
    code, err = cli_in_process("-q", "ip-adapter", tmp_path / "src", tmp_path / "out")
    assert code == 2
    assert "no IP-Adapter weights at" in err and "ip-adapter-plus.safetensors" in err
    assert "Traceback" not in err


def test_first_step_matches_the_reference(adapter, request, tmp_path):
    """The contract end to end: `python -m export reference` runs an IP-Adapter case (guidance,
    so both halves) with diffusers; the adapter's two graphs on the pixel values diffusers'
    feature extractor made, then the UNet export with their keys and values, reproduce the
    image embeddings diffusers passed the UNet and its first noise prediction."""
    from PIL import Image

    from export.reference import Case, run_batch
    from export.unet import IP_SCALE, residual_inputs

    if (adapter.family, adapter.variant) not in (("sd15", "plain"), ("sdxl", "plus")):
        pytest.skip("one plain and one plus adapter, one per family, are enough")
    exported = request.getfixturevalue(adapter.family)  # the UNet export (conftest)
    g = np.random.default_rng(4)
    # Not square and not the encoder's size: the processor resizes and centre-crops it.
    pixels = g.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "ref.png")
    scale = 0.7
    case = Case.from_json(
        {
            "name": "ip",
            "prompt": "a red house",
            "negative_prompt": "blurry",
            "steps": 1,
            "guidance": 3.0,
            "seed": 5,
            "width": 32,
            "height": 32,
            "intermediates": True,
            "ip_adapter": {
                "path": str(adapter.src),
                "subfolder": TINY_SUBFOLDER,
                "weight_name": adapter.weight_name,
            },
            "ip_adapter_image": "ref.png",
            "ip_adapter_scale": scale,
        },
        0,
    )
    run_batch(str(adapter.pipeline_dir), [case], tmp_path / "out", tmp_path)
    ref = dict(np.load(tmp_path / "out" / "ip.npz"))
    assert ref["ip_pixel_values"].shape == (1, 3, SIZE, SIZE)
    (features,) = adapter.session("image_encoder").run(
        None, {"pixel_values": ref["ip_pixel_values"]}
    )
    # The unconditional half: zeros (plain), the encoder on a zero image (plus).
    zero = np.zeros_like(ref["ip_pixel_values"])
    if adapter.variant == "plain":
        uncond = np.zeros_like(features)
    else:
        (uncond,) = adapter.session("image_encoder").run(None, {"pixel_values": zero})
    embeds = np.concatenate([uncond, features])
    assert embeds.shape == ref["ip_image_embeds"].shape
    assert float(np.abs(embeds - ref["ip_image_embeds"]).max()) <= TOL
    name = adapter.manifest["image_encoder_output"]
    kv = adapter.session("image_projection").run(None, {name: embeds})
    layers = len(adapter.manifest["layers"])
    latents = ref["initial_latents"]
    b, _, h, w = latents.shape
    feeds = {
        "sample": np.concatenate([latents, latents]),
        "timestep": np.full(2 * b, ref["timesteps"][0], np.float32),
        "encoder_hidden_states": ref["prompt_embeds"],
        IP_SCALE: np.full(layers, scale, np.float32),
    }
    if adapter.family == "sdxl":
        feeds.update(text_embeds=ref["add_text_embeds"], time_ids=ref["add_time_ids"])
    unet_config = exported.pipe.unet.config
    feeds.update({k: v.numpy() for k, v in residual_inputs(unet_config, 2 * b, h, w).items()})
    for i in range(layers):
        feeds[f"ip_key_{i}"], feeds[f"ip_value_{i}"] = kv[2 * i], kv[2 * i + 1]
    (noise_pred,) = exported.session("unet").run(None, feeds)
    want = ref["noise_pred_0"]
    assert noise_pred.shape == want.shape
    assert float(np.abs(noise_pred - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))
    # The adapter matters at this scale: without it the prediction is another.
    (plain,) = exported.session("unet").run(None, {**feeds, IP_SCALE: np.zeros(layers, np.float32)})
    assert float(np.abs(plain - want).max()) > 1e-2 * float(np.abs(want).max())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ip_adapter_scale": 0.5}, "ip_adapter_scale needs ip_adapter"),
        ({"ip_adapter_image": "a.png"}, "ip_adapter_image needs ip_adapter"),
        ({"ip_adapter": {"path": "a", "weight_name": "w"}}, "needs an ip_adapter_image"),
        ({"ip_adapter": {"path": "a"}, "ip_adapter_image": "a.png"}, "a \"weight_name\""),
        (
            {"ip_adapter": {"path": "a", "weight_name": "w", "scale": 1}, "ip_adapter_image": "a"},
            "unknown ip_adapter field",
        ),
        (
            {"ip_adapter": {"path": "a", "weight_name": "w"}, "ip_adapter_image": "a",
             "ip_adapter_scale": "high"},
            "ip_adapter_scale must be a number",
        ),
    ],
)
def test_reference_case_fields(fields, message):
    from export.reference import Case

    with pytest.raises(UserError, match=message):
        Case.from_json({"name": "c", "prompt": "p", **fields}, 0)
