"""ControlNet through A1111's `alwayson_scripts.controlnet` (the sd-webui-controlnet extension's
API, as webuiapi's ControlNetUnit sends it): the server's images equal `tcd-ort run`'s with the
same ControlNet, control image and settings, pixel for pixel."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import webuiapi
from PIL import Image

from serverlib import REPO, Server, server_binary

CONTROLNET = REPO / "models" / "tiny-sd15-controlnet"
EDGES = REPO / "models" / "control-edges-64x64.png"
PROMPT = "a house by a lake"


@pytest.fixture(scope="module")
def control_server(_binary_ok):
    s = Server(["--controlnet", str(CONTROLNET), "--shutdown-grace", "20"])
    yield s
    assert s.stop() == 0, s.stderr()


def cli_image(tmp_path, *extra: str):
    out = tmp_path / "cli.png"
    subprocess.run(
        [str(server_binary()), "run", "--model", str(REPO / "models" / "tiny-sd15"),
         "--prompt", PROMPT, "--seed", "11", "--steps", "4", "--quiet",
         "--controlnet", f"{CONTROLNET}:0.5", "--control-image", str(EDGES),
         "--output", str(out), *extra],
        check=True, cwd=REPO,
    )
    return np.asarray(Image.open(out).convert("RGB"))


def served(server, unit):
    api = webuiapi.WebUIApi(host=server.host, port=server.port)
    # A fresh dict each call: webuiapi's default `alwayson_scripts={}` is shared between calls
    # and keeps the previous call's ControlNet units.
    r = api.txt2img(prompt=PROMPT, seed=11, steps=4, cfg_scale=0, width=64, height=64,
                    controlnet_units=[unit] if unit else [], alwayson_scripts={})
    assert len(r.images) == 1
    return np.asarray(r.images[0].convert("RGB")), r


@pytest.mark.parametrize(
    "module,extra", [("none", ()), ("canny", ("--control-preprocess", "canny"))]
)
def test_controlnet_unit_matches_the_cli(control_server, tmp_path, module, extra):
    unit = webuiapi.ControlNetUnit(image=Image.open(EDGES), module=module, weight=0.5,
                                   threshold_a=100, threshold_b=200)
    image, _ = served(control_server, unit)
    assert np.array_equal(image, cli_image(tmp_path, *extra)), module
    plain, _ = served(control_server, None)
    assert not np.array_equal(image, plain), "the ControlNet changed nothing"


def test_controlnet_unit_count_must_match(control_server):
    unit = webuiapi.ControlNetUnit(image=Image.open(EDGES), module="none")
    api = webuiapi.WebUIApi(host=control_server.host, port=control_server.port)
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, controlnet_units=[unit, unit])
    assert "400" in str(err.value) and "ControlNet" in str(err.value)


def test_controlnet_unknown_module(control_server):
    unit = webuiapi.ControlNetUnit(image=Image.open(EDGES), module="openpose")
    api = webuiapi.WebUIApi(host=control_server.host, port=control_server.port)
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, controlnet_units=[unit])
    assert "openpose" in str(err.value)
