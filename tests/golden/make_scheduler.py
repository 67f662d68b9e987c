"""Writes tests/fixtures/tcd_scheduler.json: reference behaviour of diffusers' TCDScheduler.

Produced with the project's pinned exporter environment (torch 2.15.0, diffusers 0.42.1):

    .venv/bin/python tests/golden/make_scheduler.py

Contents, all read by `tests/it/scheduler.rs`:

* `configs`: scheduler_config.json dicts (SD 1.5's and SDXL's as shipped, with their foreign
  keys, plus variants) with the float32 bit patterns of `alphas_cumprod` and
  `final_alpha_cumprod` that `TCDScheduler.from_config` computes from them.
* `timesteps`: `set_timesteps` over a grid of num_inference_steps, original_inference_steps,
  strength and custom timestep lists; each case holds the resulting timesteps and
  `num_inference_steps`, or the exception type diffusers raised.
* `runs`: full sampling loops on small tensors. Samples and model outputs are float32 bit
  patterns; the scheduler's generator is `torch.Generator("cpu").manual_seed(noise_seed)`,
  which `TorchGenerator::new(noise_seed)` reproduces. Each step records both outputs.
* `add_noise`: `add_noise` on a batch of two with per-sample and broadcast timesteps.
* `step_errors`: step calls that diffusers rejects.

Never edit the JSON by hand; rerun this script.
"""

import json
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import TCDScheduler

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tcd_scheduler.json"

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as shipped.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, as shipped.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
CONFIGS = {
    "defaults": {},
    "sd15": SD15,
    "sdxl": SDXL,
    "v_prediction_zsnr": {
        **SD15,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "sample_linear": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "sample",
        "set_alpha_to_one": True,
        "timestep_spacing": "linspace",
    },
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "original_inference_steps": 25},
    "trained_betas": {
        "num_train_timesteps": 100,
        "trained_betas": [float(b) for b in np.linspace(0.001, 0.05, 100)],
        "original_inference_steps": 10,
    },
    # Carried by some configs; TCDScheduler.step never consults them.
    "thresholding_ignored": {**SD15, "thresholding": True, "clip_sample": True},
}


def bits(t: torch.Tensor) -> list:
    t = t.detach().to(torch.float32).contiguous()
    return [int(x) for x in t.view(torch.int32).numpy().view(np.uint32).reshape(-1)]


def tensor(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "bits": bits(t)}


def make(name: str) -> TCDScheduler:
    return TCDScheduler.from_config(CONFIGS[name])


def timesteps_case(config, **kw):
    s = make(config)
    case = {"config": config, "input": kw}
    try:
        s.set_timesteps(**kw)
        case["result"] = {
            "timesteps": [int(t) for t in s.timesteps],
            "num_inference_steps": int(s.num_inference_steps),
        }
    except Exception as e:  # noqa: BLE001 - the type is the recorded result
        case["error"] = type(e).__name__
    return case


def timesteps_grid():
    cases = []
    for config in ("sd15", "cosine", "trained_betas"):
        for steps in (1, 2, 4, 8, 50):
            for ois in (None, 20):
                for strength in (1.0, 0.75, 0.3, 0.99):
                    cases.append(
                        timesteps_case(
                            config,
                            num_inference_steps=steps,
                            original_inference_steps=ois,
                            strength=strength,
                        )
                    )
    extra = [
        dict(num_inference_steps=0),
        dict(num_inference_steps=1001),
        dict(num_inference_steps=51),
        dict(num_inference_steps=20, original_inference_steps=1000),
        dict(num_inference_steps=4, original_inference_steps=2000),
        dict(num_inference_steps=4, strength=0.0),
        dict(num_inference_steps=4, strength=0.05),
        dict(num_inference_steps=4, strength=0.08),
        dict(num_inference_steps=3, strength=0.5),
        dict(num_inference_steps=7, original_inference_steps=13, strength=0.9),
        dict(timesteps=[999, 759, 499, 259]),
        dict(timesteps=[999, 759, 499, 259], strength=0.5),
        dict(timesteps=[999, 759, 499, 259], strength=0.8),
        dict(timesteps=[800, 600, 300, 5]),
        dict(timesteps=[999, 759, 499, 259], original_inference_steps=20),
        dict(timesteps=[999]),
        dict(timesteps=[999, 999]),
        dict(timesteps=[259, 499]),
        dict(timesteps=[1000, 500]),
        dict(num_inference_steps=4, timesteps=[999, 500]),
        dict(),
    ]
    for kw in extra:
        cases.append(timesteps_case("sd15", **kw))
    return cases


def run_case(
    config,
    steps,
    eta,
    shape=(1, 4, 3, 5),
    strength=1.0,
    custom=None,
    begin_index=None,
    noise_seed=1234,
):
    s = make(config)
    if custom is not None:
        s.set_timesteps(timesteps=custom, strength=strength)
    else:
        s.set_timesteps(steps, strength=strength)
    if begin_index is not None:
        s.set_begin_index(begin_index)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    g = torch.Generator("cpu").manual_seed(noise_seed)
    case = {
        "config": config,
        "num_inference_steps": steps,
        "custom_timesteps": custom,
        "strength": strength,
        "eta": eta,
        "begin_index": begin_index,
        "noise_seed": noise_seed,
        "initial_sample": tensor(sample),
        "steps": [],
    }
    for i, t in enumerate(s.timesteps):
        model_output = torch.randn(
            shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float32
        )
        out = s.step(model_output, t, sample, eta=eta, generator=g)
        case["steps"].append(
            {
                "timestep": int(t),
                "model_output": tensor(model_output),
                "prev_sample": tensor(out.prev_sample),
                "pred_noised_sample": tensor(out.pred_noised_sample),
            }
        )
        sample = out.prev_sample
    return case


def runs():
    cases = []
    for config in ("sd15", "v_prediction_zsnr", "sample_linear", "cosine"):
        for steps in (4, 1):
            for eta in (0.0, 0.3, 1.0):
                cases.append(run_case(config, steps, eta))
    cases.append(run_case("sdxl", 8, 0.3, shape=(2, 4, 4, 4)))
    cases.append(run_case("sd15", 4, 0.5, strength=0.5))
    cases.append(run_case("sd15", None, 0.3, custom=[999, 759, 499, 259], strength=0.5))
    cases.append(run_case("sd15", None, 0.3, custom=[800, 600, 300, 5]))
    cases.append(run_case("sd15", 4, 0.7, begin_index=1))
    cases.append(run_case("trained_betas", 3, 0.3, shape=(3,)))
    return cases


def add_noise_cases():
    s = make("sd15")
    shape = (2, 4, 3, 5)
    original = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    cases = []
    for ts in ([999, 500], [250], [0, 1]):
        noisy = s.add_noise(original, noise, torch.tensor(ts, dtype=torch.long))
        cases.append({"timesteps": ts, "noisy": tensor(noisy)})
    return {"config": "sd15", "original": tensor(original), "noise": tensor(noise), "cases": cases}


def step_errors():
    out = []
    shape = (1, 4, 3, 5)
    x = torch.zeros(shape)
    for name, steps, t, eta, set_first in (
        ("eta_above_one", 4, 999, 1.5, True),
        ("eta_negative", 4, 999, -0.1, True),
        ("before_set_timesteps", 4, 999, 0.3, False),
        ("timestep_not_in_schedule", 4, 998, 0.3, True),
    ):
        s = make("sd15")
        if set_first:
            s.set_timesteps(steps)
        try:
            s.step(x, t, x, eta=eta, generator=torch.Generator().manual_seed(0))
            err = None
        except Exception as e:  # noqa: BLE001 - the type is the recorded result
            err = type(e).__name__
        out.append(
            {
                "name": name,
                "steps": steps,
                "timestep": t,
                "eta": eta,
                "set_timesteps": set_first,
                "error": err,
            }
        )
    return out


def main() -> None:
    configs = {}
    for name, cfg in CONFIGS.items():
        s = make(name)
        configs[name] = {
            "json": cfg,
            "alphas_cumprod": bits(s.alphas_cumprod),
            "final_alpha_cumprod": bits(s.final_alpha_cumprod.reshape(1))[0],
        }
    doc = {
        "generator": f"tests/golden/make_scheduler.py, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}",
        "configs": configs,
        "timesteps": timesteps_grid(),
        "runs": runs(),
        "add_noise": add_noise_cases(),
        "step_errors": step_errors(),
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
