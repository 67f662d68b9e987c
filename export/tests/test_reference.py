"""The diffusers reference runner: shapes, determinism and what the .npz holds."""

from __future__ import annotations

import numpy as np

from export.reference import Case, load_reference_pipeline, run_case


def test_reference_runs_and_is_deterministic(sd15):
    pipe = load_reference_pipeline(str(sd15.src))
    case = Case(prompt="a cat", steps=2, eta=0.3, guidance=2.0, seed=5, width=32, height=48,
                num_images=2)
    a = run_case(pipe, case)
    b = run_case(pipe, case)
    assert a.latents.shape == (2, 4, 24, 16) and a.latents.dtype == np.float32
    assert np.array_equal(a.latents, b.latents)
    assert len(a.images) == 2 and a.images[0].size == (32, 48)
    inter = a.intermediates
    assert inter["latents"].shape == (2, 2, 4, 24, 16)
    assert np.array_equal(inter["latents"][-1], a.latents)
    assert inter["initial_latents"].shape == (2, 4, 24, 16)
    # classifier-free guidance: negative and positive embeddings for both images
    assert inter["prompt_embeds"].shape == (4, 77, 32)
    assert inter["timesteps"].shape == (2,)
