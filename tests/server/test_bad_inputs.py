"""Bad requests get a 4xx whose JSON names the problem, in the route family's error shape."""

from __future__ import annotations

import openai
import pytest
import requests

from serverlib import API_KEY, error_text

T2I = "/sdapi/v1/txt2img"
GEN = "/v1/images/generations"


def a1111_error(r: requests.Response, status: int) -> str:
    assert r.status_code == status, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert {"error", "detail", "body", "errors"} <= set(body), body
    return error_text(r)


def openai_error(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, f"{r.status_code}: {r.text[:500]}"
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["message"]
    return err


def test_malformed_json_a1111(server, http):
    r = http.post(server.url + T2I, data=b'{"prompt": "x", "steps": ', timeout=30,
                  headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "json" in a1111_error(r, r.status_code).lower()


def test_malformed_json_openai(server, http):
    r = http.post(server.url + GEN, data=b"{not json", timeout=30,
                  headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    err = openai_error(r, r.status_code)
    assert "json" in err["message"].lower()
    assert err["type"] == "invalid_request_error"


def test_wrong_field_type(server, http, size):
    r = http.post(server.url + T2I, json={"prompt": "x", "steps": "many", "width": size},
                  timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert "steps" in a1111_error(r, r.status_code)


def test_unknown_lora_a1111(server, http, size, lora_names):
    r = http.post(server.url + T2I, json={
        "prompt": "x <lora:no_such_lora_xyz:0.8>", "steps": 1, "width": size, "height": size,
    }, timeout=60)
    msg = a1111_error(r, 400)
    assert "no_such_lora_xyz" in msg
    assert all(n in msg for n in lora_names), f"known LoRAs not listed: {msg}"


def test_unknown_lora_openai(server, http, size, lora_names):
    r = http.post(server.url + GEN, json={
        "prompt": "x", "size": f"{size}x{size}", "steps": 1,
        "loras": [{"name": "no_such_lora_xyz", "weight": 1.0}],
    }, timeout=60)
    err = openai_error(r, 400)
    assert "no_such_lora_xyz" in err["message"]
    assert all(n in err["message"] for n in lora_names), err


def test_unknown_lora_openai_client(server, size):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(prompt="x", size=f"{size}x{size}",
                          extra_body={"loras": [{"name": "no_such_lora_xyz", "weight": 1}]})
    assert "no_such_lora_xyz" in str(e.value)


@pytest.mark.parametrize(
    "width,height,field",
    [(60, 64, "width"), (64, 60, "height"), (0, 64, "width"), (64, 100_000, "height"),
     (4096, 4096, "width")],
)
def test_bad_size_a1111(server, http, width, height, field):
    r = http.post(server.url + T2I, json={
        "prompt": "x", "steps": 1, "width": width, "height": height,
    }, timeout=60)
    assert field in a1111_error(r, 400)


@pytest.mark.parametrize("size,value", [("60x64", "60"), ("64x60", "60"),
                                       ("64x100000", "100000"), ("big", "big")])
def test_bad_size_openai(server, http, size, value):
    # OpenAI's field is `size`: the error names it and the offending value.
    r = http.post(server.url + GEN, json={"prompt": "x", "size": size, "steps": 1}, timeout=60)
    err = openai_error(r, 400)
    assert err["param"] == "size" or "size" in err["message"], err
    assert value in err["message"], err


def test_response_format_url_refused(server, http, size):
    r = http.post(server.url + GEN, json={
        "prompt": "x", "size": f"{size}x{size}", "response_format": "url",
    }, timeout=60)
    err = openai_error(r, 400)
    assert "response_format" in err["message"] + " " + str(err["param"])


def test_img2img_bad_base64(server, http, size):
    r = http.post(server.url + "/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": ["!!!not base64!!!"], "steps": 1, "width": size,
        "height": size,
    }, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    msg = a1111_error(r, r.status_code).lower()
    assert "init_images" in msg or "base64" in msg or "image" in msg, msg


def test_edit_without_image(server, http):
    r = http.post(server.url + "/v1/images/edits", files={"prompt": (None, "x")}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert "image" in openai_error(r, r.status_code)["message"]


def test_oversized_body(small_body_server, http):
    # --max-body-mb 1: a 2 MiB prompt is refused with 413 before anything runs.
    # The server answers before reading the body and then drops the connection, so the answer
    # must say `Connection: close`: else a keep-alive client (requests.Session, webuiapi,
    # openai's httpx pool) reuses the dead connection and its next request fails with
    # RemoteDisconnected. Fresh connections here so one failure does not hide the next.
    big = {"prompt": "x" * (2 << 20), "steps": 1}
    for path in (T2I, GEN):
        r = requests.post(small_body_server.url + path, json=big, timeout=60)
        assert r.status_code == 413, r.text[:300]
        r.json()
        assert r.headers.get("Connection", "").lower() == "close", (
            f"413 without `Connection: close`: {dict(r.headers)}"
        )
    # Still serving.
    assert requests.get(small_body_server.url + "/healthz", timeout=10).status_code == 200


def test_unknown_route_404(server, http):
    r = http.get(server.url + "/sdapi/v1/no-such-route", timeout=10)
    assert r.status_code == 404


def test_auth_required(auth_server, http):
    url = auth_server.url
    # /healthz stays open.
    assert http.get(url + "/healthz", timeout=10).status_code == 200
    for method, path in [("GET", "/sdapi/v1/samplers"), ("GET", "/metrics"),
                         ("POST", T2I), ("POST", GEN), ("GET", "/openapi.json")]:
        body = {"prompt": "x"} if method == "POST" else None
        r = http.request(method, url + path, json=body, timeout=30)
        assert r.status_code == 401, f"{method} {path}: {r.status_code}"
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
        r.json()  # a JSON error
    ok = http.get(url + "/sdapi/v1/samplers", timeout=10,
                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    ok = http.get(url + "/sdapi/v1/samplers", timeout=10, auth=("whoever", API_KEY))
    assert ok.status_code == 200
    bad = http.get(url + "/sdapi/v1/samplers", timeout=10, headers={"Authorization": "Bearer x"})
    assert bad.status_code == 401
