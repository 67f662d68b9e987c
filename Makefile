# Two entry points for a fresh machine:
#   make demo   runs the committed tiny model (offline once ONNX Runtime is installed), writes demo.png
#   make test   installs the pinned Python environment and ONNX Runtime, builds every fixture
#               from diffusers, and runs fmt, clippy, cargo test and pytest

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
VENV_OPTIMUM := .venv-optimum
ORT_VERSION := 1.31.1
FIXTURES := tests/fixtures/generated

.PHONY: demo test ffi soak setup setup-ort venv venv-optimum fixtures lint rust-test py-test \
	server-test clean-fixtures

demo: setup-ort
	cargo run --release -- run --model models/tiny-sd15 \
		--prompt "a photo of an astronaut riding a horse on mars" \
		--steps 4 --eta 0.3 --seed 0 --output demo.png --overwrite
	@echo "demo.png written"

# The same stages, two at a time: the Rust build starts first (the Rust tests and the C ABI run
# wait for it), fixture scripts (mostly single-threaded Python) overlap with it, with each other,
# with lint and with pytest; the C ABI run needs only the build and the committed models, so it
# runs while fixtures are still being made. Cargo runs outside make's jobserver (CARGO): holding
# one of the two job slots, it would otherwise compile one crate at a time while a Python job
# holds the other.
CARGO := env -u MAKEFLAGS -u MFLAGS -u CARGO_MAKEFLAGS cargo

test: setup
	$(MAKE) -j2 --output-sync=target ci-build ci-ffi ci-rust-test ci-py-test ci-server-test lint

.PHONY: ci-build ci-rust-test ci-py-test ci-ffi ci-server-test
ci-build:
	$(CARGO) test --no-run

ci-rust-test: ci-build fixtures
	$(CARGO) test

# Only the build and the committed tiny models: it runs while the fixtures are made.
ci-ffi: ci-build
	$(MAKE) ffi

# The C ABI end to end: builds the cdylib, compiles examples/cpp/main.cpp with g++ against
# include/ and it (rpath to target/<profile>), runs it on the tiny model, installs it into a
# scratch prefix and links the example through pkg-config, then runs it under valgrind with the
# smallest request (1 step at the model's native size, one thread), FFI_VALGRIND_RUNS times, odd
# runs with the ControlNet (such a run makes the plain request too, so one run covers every call):
# 0 errors, nothing lost, in every run (tests/ffi_valgrind.sh; `tests/ffi_valgrind.sh 20` for the
# long check, which also catches what goes wrong only now and then). A run costs about 3 CPU
# minutes (0.4 s natively; 1.5 minutes under valgrind without memcheck; no faster with graph
# optimisation off). FFI_PROFILE=release uses a release build.
FFI_PROFILE ?= debug
FFI_VALGRIND_RUNS ?= 1
FFI_DIR := target/ffi
FFI_CXX := g++ -std=c++17 -Wall -Wextra -Werror -O1

ffi: setup-ort
	$(CARGO) rustc --lib --features capi --crate-type cdylib,staticlib $(if $(filter release,$(FFI_PROFILE)),--release)
	mkdir -p $(FFI_DIR)
	$(FFI_CXX) -Iinclude examples/cpp/main.cpp -Ltarget/$(FFI_PROFILE) -ltcd_ort \
		-Wl,-rpath,$(CURDIR)/target/$(FFI_PROFILE) -o $(FFI_DIR)/tcd_example
	$(FFI_DIR)/tcd_example --model models/tiny-sd15 --output $(FFI_DIR)/example.png --steps 4 \
		--controlnet models/tiny-sd15-controlnet --control-output $(FFI_DIR)/example-controlnet.png
	examples/cpp/install.sh $(FFI_DIR)/prefix $(FFI_PROFILE)
	$(FFI_CXX) examples/cpp/main.cpp \
		$$(PKG_CONFIG_PATH=$(FFI_DIR)/prefix/lib/pkgconfig pkg-config --cflags --libs tcd-ort) \
		-Wl,-rpath,$(CURDIR)/$(FFI_DIR)/prefix/lib -o $(FFI_DIR)/tcd_example_pkgconfig
	$(FFI_DIR)/tcd_example_pkgconfig --steps 1 --output $(FFI_DIR)/example-pkgconfig.png > /dev/null
	tests/ffi_valgrind.sh $(FFI_VALGRIND_RUNS) 2

# The C ABI over a long life: 200 generations on one engine, RSS every 10 (tests/soak.sh).
soak: setup-ort
	tests/soak.sh

setup: setup-ort venv

# ONNX Runtime's shared library from the official wheel, unpacked into .ort/lib, where
# tcd-ort looks for it (after --ort-lib and ORT_DYLIB_PATH).
setup-ort: .ort/lib/.installed

.ort/lib/.installed:
	rm -rf .ort/wheel && mkdir -p .ort/wheel .ort/lib
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .ort/wheel onnxruntime==$(ORT_VERSION)
	$(PYTHON) -c "import glob, os, shutil, zipfile; \
		whl = glob.glob('.ort/wheel/onnxruntime-*.whl')[0]; z = zipfile.ZipFile(whl); \
		libs = [n for n in z.namelist() if '/capi/' in n and ('libonnxruntime' in n or n.endswith('.dll') or n.endswith('.dylib'))]; \
		[shutil.copyfileobj(z.open(n), open(os.path.join('.ort/lib', os.path.basename(n)), 'wb')) for n in libs]; \
		print('installed', ', '.join(os.path.basename(n) for n in libs), 'into .ort/lib')"
	touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: export/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r export/requirements.txt
	touch $@

# optimum-cli needs an older transformers than the exporter, so it gets its own environment.
venv-optimum: $(VENV_OPTIMUM)/.installed

$(VENV_OPTIMUM)/.installed: export/requirements-optimum.txt
	$(PYTHON) -m venv $(VENV_OPTIMUM)
	$(VENV_OPTIMUM)/bin/python -m pip install -q --upgrade pip
	$(VENV_OPTIMUM)/bin/python -m pip install -q -r export/requirements-optimum.txt
	touch $@

# Golden numbers: torch's generator, diffusers' TCDScheduler, transformers' tokenizer, the
# diffusers pipelines on tiny random-weight models (exported to ONNX here, and with optimum-cli),
# LoRAs in every key format with diffusers' own deltas and images, tiny ControlNets, OpenCV's
# Canny, the ControlNet-depth guide's depth maps on a tiny hybrid DPT, transformers'
# CLIPImageProcessor (an IP-Adapter's reference image) with Pillow's resize, float16 exports
# against diffusers run in float16, tiny plain and plus IP-Adapters with diffusers'
# load_ip_adapter, a tiny AnimateDiff motion adapter with TCD and motion LoRAs through
# diffusers' AnimateDiffPipeline, a tiny AutoencoderTiny (TAESD) as the SD1.5 pipeline's VAE, and
# diffusers' VAE tiling (enable_tiling: tiled decode and encode) on the tiny SD1.5 pipeline.
FIXTURE_NAMES := rng scheduler tokenizer canny depth clip_image parity lora lora_slots img2img \
	controlnet fp16 optimum ip_adapter animatediff vae_tiny vae_tiling
fixtures: $(FIXTURE_NAMES:%=fixture-%)

.PHONY: $(FIXTURE_NAMES:%=fixture-%)
fixture-rng fixture-scheduler fixture-tokenizer fixture-canny: venv
	$(VPY) tests/golden/make_$(@:fixture-%=%).py
fixture-depth fixture-clip_image fixture-parity fixture-fp16: venv
	$(VPY) tests/golden/make_$(@:fixture-%=%).py $(FIXTURES)/$(@:fixture-%=%)
# These start from the parity fixtures' tiny diffusers pipelines.
fixture-lora fixture-lora_slots fixture-img2img fixture-controlnet fixture-animatediff \
		fixture-vae_tiny fixture-vae_tiling: venv fixture-parity
	$(VPY) tests/golden/make_$(@:fixture-%=%).py $(FIXTURES)/$(@:fixture-%=%)
# Its SD1.5 ControlNet case uses the ControlNet fixtures' controlnet_0.
fixture-ip_adapter: venv fixture-parity fixture-controlnet
	$(VPY) tests/golden/make_$(@:fixture-%=%).py $(FIXTURES)/$(@:fixture-%=%)
fixture-optimum: venv-optimum fixture-parity
	$(VENV_OPTIMUM)/bin/python tests/golden/make_optimum.py $(FIXTURES)/parity $(FIXTURES)/optimum

lint: venv
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(VPY) -m ruff check --config export/ruff.toml --cache-dir target/ruff-cache \
		export tests/golden benches tests/server

rust-test: setup-ort
	cargo test

py-test: venv
	$(VPY) -m pytest -q export/tests

# In `make test` the session fixtures reuse the parity fixtures' exports (same pipelines, same
# exporter, this checkout) instead of exporting them again.
ci-py-test: venv fixture-parity
	TCD_ORT_REUSE_EXPORTS=$(CURDIR)/$(FIXTURES)/parity $(VPY) -m pytest -q --durations=15 export/tests

# `tcd-ort serve` end to end with real clients (webuiapi, openai) on loopback (tests/server): needs
# the debug binary and ONNX Runtime; the LoRA tests need the LoRA fixtures and skip without them.
server-test: setup-ort venv
	TCD_ORT_BIN=$(CURDIR)/target/debug/tcd-ort $(VPY) -m pytest -q tests/server

# In `make test`: after the debug build (`cargo test --no-run` builds the binary), with the
# LoRA fixtures.
ci-server-test: ci-build fixture-lora
	$(MAKE) server-test

clean-fixtures:
	rm -rf $(FIXTURES)
