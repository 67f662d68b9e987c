"""Session fixtures: build each tiny pipeline once, export it once, share the sessions."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pytest
import torch

from export.convert import convert
from export.tiny import build_tiny

torch.set_num_threads(2)
logging.getLogger("export").setLevel(logging.WARNING)


class Exported:
    def __init__(self, family: str, src: pathlib.Path, onnx_dir: pathlib.Path, manifest: dict):
        from diffusers import DiffusionPipeline

        self.family = family
        self.src = src
        self.dir = onnx_dir
        self.manifest = manifest
        self.pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
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


# `make test` builds the parity fixtures first: the same tiny pipelines (seed 0) converted with
# the same defaults, from this checkout. Pointing this variable at them spares three exports;
# without it each session exports its own.
REUSE = os.environ.get("TCD_ORT_REUSE_EXPORTS")


def _export(tmp_path_factory, family: str) -> Exported:
    if REUSE:
        made = pathlib.Path(REUSE) / family
        manifest = made / "onnx" / "tcd_ort.json"
        if (made / "diffusers" / "model_index.json").is_file() and manifest.is_file():
            made_manifest = json.loads(manifest.read_text())
            return Exported(family, made / "diffusers", made / "onnx", made_manifest)
    root = tmp_path_factory.mktemp(family)
    src = build_tiny(family, root / "diffusers", seed=0)
    manifest = convert(str(src), root / "onnx")
    return Exported(family, src, root / "onnx", manifest)


@pytest.fixture(scope="session")
def sd15(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def sd21v(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory, "sd21v")


# sd21v stands for both SD2 tiny families: sd21 differs from it only in the scheduler's
# prediction_type and a no-op (float32) attention upcast.
@pytest.fixture(scope="session", params=["sd15", "sdxl", "sd21v"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


@pytest.fixture
def cli_in_process(capsys):
    """Runs `python -m export ARGS` in this process (each subprocess would import torch again):
    returns the exit status and what went to stderr. An uncaught exception fails the test, as a
    traceback would."""

    def run(*args) -> tuple[int, str]:
        from export.cli import main

        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, capsys.readouterr().err

    return run
