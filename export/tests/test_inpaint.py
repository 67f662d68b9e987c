"""Inpainting UNets (9 input channels): the tiny families are saved as diffusers' inpainting
pipelines and `convert` exports a UNet whose `sample` is latents, mask and masked-image latents
concatenated on channels, matching the PyTorch UNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.errors import UserError
from export.reference import Case, load_reference_pipeline, run_case
from export.tests.conftest import _export
from export.unet import plain_inputs

TOL = 1e-4
PIPELINES = {
    "sd15-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def inpaint(request, tmp_path_factory):
    return _export(tmp_path_factory, request.param)


def test_inpaint_pipeline_and_manifest(inpaint):
    index = json.loads((inpaint.dir / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[inpaint.family]
    if inpaint.family == "sdxl-inpaint":
        assert index["requires_aesthetics_score"] is False
        assert index["force_zeros_for_empty_prompt"] is True
    assert inpaint.manifest["family"] == inpaint.family.removesuffix("-inpaint")
    unet = inpaint.manifest["components"]["unet"]
    assert unet["inputs"]["sample"]["shape"] == ["batch", 9, "height", "width"]
    assert unet["outputs"]["out_sample"]["shape"] == ["batch", 4, "height", "width"]
    assert json.loads((inpaint.dir / "unet" / "config.json").read_text())["in_channels"] == 9


def test_inpaint_unet(inpaint):
    unet = inpaint.pipe.unet
    b, h, w = 2, 24, 32
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(b, 9, h, w, generator=g)
    sample[:, 4] = (sample[:, 4] > 0).float()  # the mask channel is binary in the pipelines
    timestep = torch.tensor([999.0, 499.0])
    ehs = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs}
    added = None
    if inpaint.family == "sdxl-inpaint":
        added = {
            "text_embeds": torch.randn(b, 32, generator=g),
            "time_ids": torch.tensor([[h * 2.0, w * 2.0, 0.0, 0.0, h * 2.0, w * 2.0]] * b),
        }
        feeds.update(added)
    feeds.update(plain_inputs(unet, b, h, w))  # no ControlNet, no IP-Adapter
    got = inpaint.session("unet").run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        ref = unet(sample, timestep, ehs, added_cond_kwargs=added).sample
    assert got.shape == (b, 4, h, w)
    assert float(ref.abs().mean()) > 1e-2
    assert float(np.abs(got - ref.numpy()).max()) <= TOL


def test_reference_inpaint_case(inpaint, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 24), (200, 80, 40)).save(tmp_path / "image.png")
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (8, 4, 24, 20))
    mask.save(tmp_path / "mask.png")
    pipe = load_reference_pipeline(str(inpaint.src))
    case = Case(prompt="a cat", steps=4, eta=0.3, seed=3, width=32, height=16, image="image.png",
                mask="mask.png", strength=0.75)
    result = run_case(pipe, case, tmp_path)
    inter = result.intermediates
    assert result.images[0].size == (32, 16)
    assert result.latents.shape == (1, 4, 8, 16)
    # int(4 * 0.75) = 3 of the 4 scheduled timesteps, noise added at the first of them.
    assert inter["timesteps"].tolist() == inter["schedule_timesteps"][1:].tolist()
    assert inter["latent_timestep"].tolist() == inter["timesteps"][:1].tolist()
    assert inter["mask"].shape == (1, 1, 8, 16) and set(np.unique(inter["mask"])) == {0.0, 1.0}
    assert inter["masked_image_latents"].shape == (1, 4, 8, 16)
    assert inter["latents"].shape == (3, 1, 4, 8, 16)
    # A 9-channel UNet cannot run image-to-image.
    with pytest.raises(UserError, match="inpainting model"):
        run_case(pipe, Case(prompt="a cat", image="image.png"), tmp_path)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mask": "m.png"}, "needs an image"),
        ({"image": "i.png", "strength": 0.0}, "strength"),
        ({"strength": 0.5}, "strength needs an image"),
    ],
)
def test_reference_image_case_checks(fields, message):
    with pytest.raises(UserError, match=message):
        Case.from_json({"name": "x", "prompt": "p", **fields}, 0)
