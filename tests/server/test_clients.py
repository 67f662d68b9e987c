"""Real clients against `tcd-ort serve`: webuiapi (A1111 routes) and openai (Images API)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from serverlib import API_KEY, decode_png, png_bytes


def webui(server, **kw) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=server.host, port=server.port, **kw)


def oai(server, key="unused") -> openai.OpenAI:
    # No retries: a 429/5xx must show up as one, not be retried behind the test's back.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def info_dict(result) -> dict:
    # webuiapi json.loads the "info" string; a dict here means it was a JSON string.
    assert isinstance(result.info, dict), f"info is not a JSON string: {result.json.get('info')!r}"
    return result.info


def all_notes(info) -> str:
    return "\n".join(list(info.get("infotexts", [])) + list(info.get("tcd_notes", [])))


# --- webuiapi -----------------------------------------------------------------------------


def test_webuiapi_txt2img(server, size):
    api = webui(server)
    r = api.txt2img(
        prompt="a red square", negative_prompt="blurry", seed=7, steps=4,
        width=size, height=size, batch_size=2,
    )
    assert len(r.images) == 2
    for im in r.images:
        assert im.size == (size, size)
        assert im.format == "PNG"
        assert "parameters" in im.info, "PNG without the A1111 `parameters` text chunk"
    info = info_dict(r)
    assert info["sampler_name"] == "TCD"
    assert info["width"] == size and info["height"] == size
    assert info["seed"] == 7
    assert info["steps"] == 4
    assert info["batch_size"] == 2 and info["n_iter"] == 1
    assert len(info["all_seeds"]) == 2
    assert len(info["infotexts"]) == 2
    assert "a red square" in info["infotexts"][0]
    assert info["prompt"] == "a red square"
    assert info["negative_prompt"] == "blurry"
    # webuiapi always sends sampler_name "Euler a": the server answers with TCD and says so.
    assert any("Euler a" in n or "sampler" in n.lower() for n in info["tcd_notes"]), info
    assert isinstance(r.parameters, dict) and r.parameters.get("prompt") == "a red square"


def test_webuiapi_txt2img_non_square_and_n_iter(server):
    api = webui(server)
    r = api.txt2img(prompt="x", seed=1, steps=2, width=80, height=48, n_iter=2)
    assert [im.size for im in r.images] == [(80, 48), (80, 48)]
    assert info_dict(r)["n_iter"] == 2


def test_webuiapi_same_seed_same_image(server, size):
    api = webui(server)
    a = api.txt2img(prompt="a tree", seed=123, steps=3, width=size, height=size).image
    b = api.txt2img(prompt="a tree", seed=123, steps=3, width=size, height=size).image
    assert np.array_equal(pixels(a), pixels(b))


def test_webuiapi_random_seed_reported(server, size):
    r = webui(server).txt2img(prompt="x", seed=-1, steps=1, width=size, height=size)
    seed = info_dict(r)["seed"]
    assert isinstance(seed, int) and seed >= 0


def test_webuiapi_img2img_with_mask(server, size):
    api = webui(server)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    r = api.img2img(
        images=[init], mask_image=mask, prompt="a blue circle", seed=3, steps=4,
        denoising_strength=0.75, width=size, height=size,
    )
    assert len(r.images) == 1 and r.image.size == (size, size)
    info = info_dict(r)
    assert info["sampler_name"] == "TCD"


def test_webuiapi_img2img_without_mask(server):
    init = Image.new("RGB", (80, 48), (200, 30, 30))
    r = webui(server).img2img(
        images=[init], prompt="x", seed=3, steps=2, denoising_strength=0.5, width=80, height=48
    )
    assert r.image.size == (80, 48)
    assert info_dict(r)["sampler_name"] == "TCD"


def test_webuiapi_lora_tag(server, size, lora_names):
    api = webui(server)
    name = lora_names[0]
    kw = dict(seed=11, steps=3, width=size, height=size)
    plain = api.txt2img(prompt="a house", **kw)
    with_lora = api.txt2img(prompt=f"a house <lora:{name}:0.8>", **kw)
    info = info_dict(with_lora)
    notes = all_notes(info)
    assert name in notes and "0.8" in notes, notes
    # The tag is taken out of the prompt the model sees; the LoRA changes the image.
    assert not np.array_equal(pixels(plain.image), pixels(with_lora.image))
    # And it does not stick: the next request without a tag is the plain image again.
    again = api.txt2img(prompt="a house", **kw)
    assert np.array_equal(pixels(plain.image), pixels(again.image))


def test_webuiapi_two_loras(server, size, lora_names):
    if len(lora_names) < 2:
        pytest.skip("needs two LoRA fixtures")
    a, b = lora_names[:2]
    r = webui(server).txt2img(
        prompt=f"x <lora:{a}:0.5> <lora:{b}:0.7>", seed=1, steps=2, width=size, height=size
    )
    notes = all_notes(info_dict(r))
    assert a in notes and b in notes, notes


def test_webuiapi_listings(server, lora_names):
    api = webui(server)
    samplers = api.get_samplers()
    assert [s["name"] for s in samplers] == ["TCD"]
    assert "tcd" in samplers[0]["aliases"]
    loras = api.get_loras()
    assert sorted(x["name"] for x in loras) == sorted(lora_names)
    for x in loras:
        assert {"name", "alias", "metadata"} <= set(x)
    text = json.dumps(loras)
    assert "/" not in text and ".safetensors" not in text, f"filesystem paths leak: {text}"
    models = api.get_sd_models()
    assert len(models) >= 1
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert api.util_get_model_names()  # sorted titles: webuiapi reads "title"
    opts = api.get_options()
    assert "sd_model_checkpoint" in opts
    assert opts.get("samples_format") == "png"
    progress = api.get_progress()
    assert 0.0 <= progress["progress"] <= 1.0
    assert "state" in progress and "interrupted" in progress["state"]


def test_progress_idle_after_job(server, size):
    """A1111 answers progress 0 and job_count 0 when nothing runs (clients poll it to see a job
    end); not the last job's 1.0."""
    api = webui(server)
    api.txt2img(prompt="x", seed=1, steps=3, width=size, height=size)
    p = api.get_progress()
    assert p["state"]["job_count"] == 0, p
    assert p["progress"] == 0, p


def test_webuiapi_interrupt(server):
    api = webui(server)
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["result"] = api.txt2img(prompt="slow", seed=1, steps=24, width=256, height=256)
        except RuntimeError as e:  # webuiapi raises RuntimeError(status, text) on non-200
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # This job's own progress (24 steps), not what the last job left behind.
        st = api.get_progress()["state"]
        if st.get("sampling_steps") == 24 and 1 <= st.get("sampling_step", 0) < 24:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the slow request never showed progress")
    t_int = time.monotonic()
    answer = api.interrupt()  # webuiapi calls .json() on the answer: it must be JSON
    assert isinstance(answer, dict | list)
    t.join(120)
    assert not t.is_alive(), "interrupted request did not finish"
    after = time.monotonic() - t_int
    assert after < 20, f"request ran {after:.1f}s after the interrupt"
    if "error" in out:
        status = out["error"].args[0]
        assert status == 409, f"interrupted request answered {out['error'].args}"
    # The server is still serving afterwards.
    r = api.txt2img(prompt="after", seed=1, steps=1, width=64, height=64)
    assert r.image.size == (64, 64)


def test_webuiapi_auth(auth_server, size):
    api = webui(auth_server, username="anyone", password=API_KEY)
    r = api.txt2img(prompt="x", seed=1, steps=1, width=size, height=size)
    assert r.image.size == (size, size)
    assert [s["name"] for s in api.get_samplers()] == ["TCD"]
    anon = webui(auth_server)
    with pytest.raises(RuntimeError) as e:
        anon.txt2img(prompt="x", seed=1, steps=1, width=size, height=size)
    assert e.value.args[0] == 401
    wrong = webui(auth_server, username="anyone", password="nope")
    with pytest.raises(RuntimeError) as e:
        wrong.txt2img(prompt="x", seed=1, steps=1, width=size, height=size)
    assert e.value.args[0] == 401


# --- openai -------------------------------------------------------------------------------


def test_openai_generate(server, size):
    r = oai(server).images.generate(
        prompt="a green triangle", n=2, size=f"{size}x{size}", extra_body={"steps": 2, "seed": 5}
    )
    assert isinstance(r.created, int) and r.created > 1_600_000_000
    assert len(r.data) == 2
    for d in r.data:
        assert decode_png(d.b64_json).size == (size, size)


def test_openai_generate_b64_explicit_and_auto_size(server, size):
    r = oai(server).images.generate(
        prompt="x", size="auto", response_format="b64_json", extra_body={"steps": 1}
    )
    assert len(r.data) == 1
    assert decode_png(r.data[0].b64_json).size == (size, size)


def test_openai_generate_non_square(server):
    r = oai(server).images.generate(prompt="x", size="80x48", extra_body={"steps": 1, "seed": 2})
    assert decode_png(r.data[0].b64_json).size == (80, 48)


def test_openai_generate_lora_extra(server, size, lora_names):
    c = oai(server)
    kw = dict(prompt="a boat", size=f"{size}x{size}")
    plain = c.images.generate(**kw, extra_body={"steps": 2, "seed": 9})
    lora = c.images.generate(
        **kw, extra_body={"steps": 2, "seed": 9, "loras": [{"name": lora_names[0], "weight": 1.0}]}
    )
    a, b = decode_png(plain.data[0].b64_json), decode_png(lora.data[0].b64_json)
    assert not np.array_equal(pixels(a), pixels(b))


def test_openai_edit_with_mask(server, size):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size // 2, size))  # left half transparent = repaint
    r = oai(server).images.edit(
        image=("image.png", png_bytes(image), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a cat",
        n=1,
        size=f"{size}x{size}",
        extra_body={"steps": 2, "seed": 4},
    )
    assert len(r.data) == 1
    assert decode_png(r.data[0].b64_json).size == (size, size)


def test_openai_edit_own_transparency(server, size):
    # No mask: the image's own transparent pixels are repainted.
    image = Image.new("RGBA", (size, size), (10, 200, 10, 255))
    image.paste((0, 0, 0, 0), (0, 0, size, size // 2))
    r = oai(server).images.edit(
        image=io.BytesIO(png_bytes(image)), prompt="sky", n=2, size=f"{size}x{size}",
        extra_body={"steps": 2, "strength": 0.9},
    )
    assert len(r.data) == 2
    for d in r.data:
        assert decode_png(d.b64_json).size == (size, size)


def test_openai_auth(auth_server, size):
    r = oai(auth_server, API_KEY).images.generate(
        prompt="x", size=f"{size}x{size}", extra_body={"steps": 1}
    )
    assert len(r.data) == 1
    with pytest.raises(openai.AuthenticationError) as e:
        oai(auth_server, "wrong-key").images.generate(prompt="x", size=f"{size}x{size}")
    assert e.value.status_code == 401
    assert isinstance(e.value.body, dict) and e.value.body.get("message"), e.value.body
