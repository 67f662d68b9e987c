"""Fixtures for the `tcd-ort serve` tests: servers started as subprocesses on 127.0.0.1:0.

TCD_ORT_BIN picks the binary (default target/debug/tcd-ort); without one that has a `serve`
subcommand every test here is skipped. Each server is stopped with SIGTERM at teardown and must
exit 0.
"""

from __future__ import annotations

import pytest
import requests

from serverlib import API_KEY, Server, binary_problem, make_lora_dir, native_size

# Every server: a short drain so teardown never waits long.
COMMON = ["--shutdown-grace", "20"]


@pytest.fixture(scope="session")
def size() -> int:
    """The model's native side (64 for models/tiny-sd15: UNet sample 32, VAE factor 2)."""
    return native_size()


@pytest.fixture(scope="session")
def _binary_ok():
    problem = binary_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def lora_setup(tmp_path_factory):
    """(dir, names): a LoRA dir with the tiny sd15 LoRAs; names empty when the fixtures are
    missing (then the LoRA tests skip)."""
    d = tmp_path_factory.mktemp("loras")
    return d, make_lora_dir(d)


@pytest.fixture(scope="session")
def lora_names(lora_setup):
    names = lora_setup[1]
    if not names:
        pytest.skip("LoRA fixtures missing (make fixture-lora)")
    return names


def _start(args):
    return Server(COMMON + args)


def _stop(server: Server):
    rc = server.stop()
    assert rc == 0, f"server exited {rc} after SIGTERM\n{server.stderr()}"


@pytest.fixture(scope="session")
def server(_binary_ok, lora_setup):
    """The default server: LoRA dir, no API key, queue 8."""
    s = _start(["--lora-dir", str(lora_setup[0])])
    yield s
    _stop(s)


@pytest.fixture(scope="session")
def auth_server(_binary_ok, lora_setup):
    s = _start(["--lora-dir", str(lora_setup[0]), "--api-key", API_KEY])
    yield s
    _stop(s)


@pytest.fixture(scope="session")
def small_body_server(_binary_ok):
    s = _start(["--max-body-mb", "1"])
    yield s
    _stop(s)


@pytest.fixture(scope="session")
def queue_server(_binary_ok):
    s = _start(["--queue", "1", "--workers", "1"])
    yield s
    _stop(s)


@pytest.fixture
def fresh_server(_binary_ok):
    """A server of the test's own, for tests that end it (SIGTERM while busy)."""
    s = _start([])
    yield s
    if s.proc.poll() is None:
        _stop(s)


@pytest.fixture
def http():
    with requests.Session() as s:
        yield s
