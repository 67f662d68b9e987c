"""Each exported graph against the PyTorch module it came from (tiny random-weight models).

Two spatial sizes per image model, one of them non-square and neither the size used at export
time, prove the height/width axes are really dynamic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.unet import (
    IP_KEY,
    IP_SCALE,
    IP_VALUE,
    ip_adapter_inputs,
    plain_inputs,
    residual_inputs,
)

TOL = 1e-4
SIZES = [(1, 16, 16), (2, 24, 32)]


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _ids(tokenizer, prompts):
    return tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("prompts", [["a photo of a cat"], ["a red car", "an astronaut, 8k"]])
def test_text_encoders(exported, prompts):
    names = ["text_encoder"] + (["text_encoder_2"] if exported.family == "sdxl" else [])
    for name in names:
        model = getattr(exported.pipe, name)
        tok = getattr(exported.pipe, "tokenizer_2" if name == "text_encoder_2" else "tokenizer")
        ids = _ids(tok, prompts)
        sess = exported.session(name)
        out_names = [o.name for o in sess.get_outputs()]
        got = dict(
            zip(
                out_names,
                sess.run(None, {"input_ids": ids.numpy().astype(np.int32)}),
                strict=True,
            )
        )
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True)
        assert _max_diff(got["last_hidden_state"], ref.last_hidden_state) <= TOL
        if name == "text_encoder_2":
            assert _max_diff(got["text_embeds"], ref.text_embeds) <= TOL
        else:
            assert _max_diff(got["pooler_output"], ref.pooler_output) <= TOL
        if exported.family == "sdxl":
            n = model.config.num_hidden_layers
            assert len(ref.hidden_states) == n + 1
            for i, h in enumerate(ref.hidden_states):
                assert _max_diff(got[f"hidden_states.{i}"], h) <= TOL, (name, i)
        else:
            assert not any(n.startswith("hidden_states") for n in out_names)


def _unet_inputs(exported, b, h, w):
    unet = exported.pipe.unet
    g = torch.Generator().manual_seed(h * w)
    sample = torch.randn(b, 4, h, w, generator=g)
    timestep = torch.tensor([999.0, 499.0][:b])
    ehs = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs}
    added = None
    if exported.family == "sdxl":
        text_embeds = torch.randn(b, 32, generator=g)
        time_ids = torch.tensor([[h * 2.0, w * 2.0, 0.0, 0.0, h * 2.0, w * 2.0]] * b)
        feeds.update(text_embeds=text_embeds, time_ids=time_ids)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return feeds, added, g


@pytest.mark.parametrize("b,h,w", SIZES)
def test_unet(exported, b, h, w):
    """All-zero ControlNet residuals: the plain UNet."""
    unet = exported.pipe.unet
    feeds, added, _ = _unet_inputs(exported, b, h, w)
    feeds.update(plain_inputs(unet, b, h, w))
    got = exported.session("unet").run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        ref = unet(
            feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample
    assert got.shape == (b, 4, h, w)
    # Non-degenerate random weights: the comparison has to mean something.
    assert float(ref.abs().mean()) > 1e-2
    assert _max_diff(got, ref) <= TOL


# The second size has an odd latent height: every downsampled residual is ceil(h / 2) high.
@pytest.mark.parametrize("b,h,w", [(1, 16, 16), (2, 24, 40), (1, 7, 10)])
def test_unet_controlnet_residuals(exported, b, h, w):
    """Random residuals reach the UNet as diffusers' down_block_additional_residuals /
    mid_block_additional_residual do."""
    unet = exported.pipe.unet
    feeds, added, g = _unet_inputs(exported, b, h, w)
    residuals = residual_inputs(unet.config, b, h, w, g)
    sess = exported.session("unet")
    names = [i.name for i in sess.get_inputs()]
    first = names.index("down_block_additional_residual_0")
    assert names[first : first + len(residuals)] == list(residuals)
    ip = ip_adapter_inputs(unet, b)
    assert names[first + len(residuals) :] == list(ip)
    got = sess.run(None, {k: v.numpy() for k, v in {**feeds, **residuals, **ip}.items()})[0]
    down = tuple(v for k, v in residuals.items() if k.startswith("down_"))
    with torch.no_grad():
        args = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
        ref = unet(
            *args,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=residuals["mid_block_additional_residual"],
        ).sample
        plain = unet(*args, added_cond_kwargs=added).sample
    assert got.shape == (b, 4, h, w)
    assert _max_diff(ref, plain) > 1e-2  # the residuals matter
    assert _max_diff(got, ref) <= TOL


def _ip_adapter_unet(unet, tokens: int, scale: float, g):
    """A copy of `unet` with diffusers' `IPAdapterAttnProcessor2_0` on every IP-Adapter layer
    (random `to_k_ip` / `to_v_ip`), and the exported UNet's inputs for the same adapter."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    unet = copy.deepcopy(unet)
    b, width = tokens.shape[0], unet.config.cross_attention_dim
    procs, feeds = {}, {}
    layer = 0
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        dim = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        proc = IPAdapterAttnProcessor2_0(dim, width, scale=scale, num_tokens=[tokens.shape[1]])
        with torch.no_grad():
            for linear, key in ((proc.to_k_ip[0], IP_KEY), (proc.to_v_ip[0], IP_VALUE)):
                linear.weight.copy_(torch.randn(dim, width, generator=g) * 0.3)
                feeds[key.format(layer)] = linear(tokens)
        procs[name] = proc
        layer += 1
    unet.set_attn_processor(procs)
    feeds[IP_SCALE] = torch.full((layer,), scale)
    assert len(feeds) == 2 * layer + 1 == len(ip_adapter_inputs(unet, b))
    return unet, feeds


@pytest.mark.parametrize("scale", [0.0, 0.6])
def test_unet_ip_adapter_branch(exported, scale):
    """The UNet's IP-Adapter inputs do what diffusers' IPAdapterAttnProcessor2_0 does with the
    same image tokens through the same to_k_ip / to_v_ip (scale 0 included: diffusers skips
    the branch, the export adds zero)."""
    b, h, w = 2, 8, 16
    feeds, added, g = _unet_inputs(exported, b, h, w)
    tokens = torch.randn(b, 4, exported.pipe.unet.config.cross_attention_dim, generator=g)
    unet, ip = _ip_adapter_unet(exported.pipe.unet, tokens, scale, g)
    feeds.update(residual_inputs(unet.config, b, h, w))
    feeds.update(ip)
    got = exported.session("unet").run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    args = (feeds["sample"], feeds["timestep"])
    with torch.no_grad():
        ehs = (feeds["encoder_hidden_states"], [tokens])
        ref = unet(*args, ehs, added_cond_kwargs=added).sample
        plain = exported.pipe.unet(
            *args, feeds["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
    assert _max_diff(got, ref) <= TOL
    assert (_max_diff(ref, plain) > 1e-2) == (scale > 0)


@pytest.mark.parametrize("b,h,w", SIZES)
def test_vae_decoder(exported, b, h, w):
    vae = exported.pipe.vae
    latents = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(1))
    got = exported.session("vae_decoder").run(None, {"latent_sample": latents.numpy()})[0]
    with torch.no_grad():
        ref = vae.decode(latents).sample
    assert got.shape == (b, 3, h * 2, w * 2)
    assert float(ref.abs().mean()) > 1e-2
    assert _max_diff(got, ref) <= TOL


@pytest.mark.parametrize("b,h,w", SIZES)
def test_vae_encoder(exported, b, h, w):
    vae = exported.pipe.vae
    image = torch.rand(b, 3, h * 2, w * 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = exported.session("vae_encoder").run(None, {"sample": image.numpy()})[0]
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    assert got.shape == (b, 8, h, w)
    assert _max_diff(got, dist.parameters) <= TOL
    mean, logvar = np.split(got, 2, axis=1)
    assert _max_diff(mean, dist.mean) <= TOL
