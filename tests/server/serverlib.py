"""Helpers for the `tcd-ort serve` tests (tests/server) and the load bench (benches/serve_load.py).

Starts the server as a subprocess the way a user would (`tcd-ort serve --model DIR --listen
127.0.0.1:0 ...`), waits for its one readiness line on stderr (`listening on http://HOST:PORT`),
and stops it with SIGTERM. Standard library only (plus Pillow for the image helpers), so the
bench can import it too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-sd15"
# The sd15 LoRA fixtures (tests/golden/make_lora.py) are made for
# tests/fixtures/generated/parity/sd15 (index.json's "base"), whose ONNX export has the same
# weights as models/tiny-sd15.
LORA_FIXTURES = REPO / "tests" / "fixtures" / "generated" / "lora" / "sd15"
# name in the server's LoRA dir (the file stem, what `<lora:NAME:W>` uses) -> fixture file
LORA_FILES = {"tiny_lora_a": "diffusers.safetensors", "tiny_lora_b": "kohya.safetensors"}

API_KEY = "test-key-0123456789"

LISTENING = re.compile(r"listening on http://(\S+):(\d+)")


def server_binary() -> Path:
    return Path(os.environ.get("TCD_ORT_BIN", REPO / "target" / "debug" / "tcd-ort"))


def binary_problem() -> str | None:
    """Why the server cannot be tested (no binary, or one without `serve`), or None."""
    binary = server_binary()
    if not binary.is_file():
        return f"{binary} does not exist (set TCD_ORT_BIN or build tcd-ort)"
    try:
        r = subprocess.run(
            [str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} serve --help failed: {e}"
    if r.returncode != 0:
        return f"{binary} has no working `serve` subcommand: {(r.stderr or r.stdout).strip()[:300]}"
    return None


def native_size(model: Path = MODEL) -> int:
    """The model's native image side: the UNet's sample_size times the VAE's scale factor."""
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae_decoder" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def make_lora_dir(dest: Path) -> list[str]:
    """Copies the tiny sd15 LoRA fixtures into `dest` under the names in LORA_FILES (only the
    LoRAs themselves: the fixture dir also holds deltas and broken files). Returns the names
    copied: none when the fixtures were not generated (`make fixture-lora`)."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for name, file in LORA_FILES.items():
        src = LORA_FIXTURES / file
        if src.is_file():
            shutil.copyfile(src, dest / f"{name}.safetensors")
            names.append(name)
    return names


class Server:
    """One `tcd-ort serve` process."""

    def __init__(self, args: list[str], *, model: Path = MODEL, ready_timeout: float = 180.0):
        self.args = [
            str(server_binary()),
            "serve",
            "--model",
            str(model),
            "--listen",
            "127.0.0.1:0",
            *args,
        ]
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self.host = self.port = None
        # `serve` reads TCD_ORT_API_KEY when --api-key is not given: only the flag counts here.
        env = {k: v for k, v in os.environ.items() if k != "TCD_ORT_API_KEY"}
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before it was ready: "
                    f"{' '.join(self.args)}\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(
                    f"no `listening on` line in {ready_timeout}s: {' '.join(self.args)}\n"
                    f"{self.stderr()}"
                )

    def _read_stderr(self):
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            if not self._ready.is_set():
                m = LISTENING.search(line)
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    self._ready.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self, last: int = 40) -> str:
        return "\n".join(self.stderr_lines[-last:])

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM, then wait; returns the exit code (kills it and raises past `timeout`)."""
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(
                f"server did not exit within {timeout}s of SIGTERM\n{self.stderr()}"
            ) from None
        self._reader.join(5)
        return rc

    def rss_kib(self) -> int | None:
        """VmRSS from /proc/PID/status, in KiB (None once the process is gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def decode_png(b64: str):
    """A base64 PNG (as the server answers) -> PIL image, checking it is a PNG."""
    from PIL import Image

    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {raw[:16]!r}"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def error_text(response) -> str:
    """Every message an error response carries, either shape (A1111's detail/errors or
    OpenAI's error.message), for `in` checks; the raw text when it is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    parts = []
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            parts += [str(err.get("message", "")), str(err.get("param", ""))]
        elif err is not None:
            parts.append(str(err))
        for key in ("detail", "errors", "message"):
            if key in body:
                parts.append(str(body[key]))
    return " | ".join(parts) if parts else json.dumps(body)
