"""Fused attention (export/attention.py): the swapped processor computes what diffusers'
AttnProcessor2_0 does, the export emits one com.microsoft.MultiHeadAttention per attention with
every weight under its own name, ONNX Runtime runs it to the same numbers, and `plain` exports
stay standard ONNX."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from export.attention import FusedAttnProcessor, fused_attention, graph_attention
from export.onnx_io import Io, export_component


class _Block(torch.nn.Module):
    """A transformer block's two attentions and a VAE-style spatial attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn1 = Attention(32, heads=4, dim_head=8)
        self.attn2 = Attention(32, cross_attention_dim=24, heads=4, dim_head=8)
        self.spatial = Attention(
            32,
            heads=1,
            dim_head=32,
            norm_num_groups=8,
            residual_connection=True,
            rescale_output_factor=2.0,
            bias=True,
            upcast_softmax=True,
        )

    def forward(self, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = sample.shape
        tokens = sample.reshape(batch, channels, height * width).transpose(1, 2)
        tokens = tokens + self.attn1(tokens)
        tokens = tokens + self.attn2(tokens, encoder_hidden_states=context)
        sample = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.spatial(sample)


def _block() -> _Block:
    torch.manual_seed(0)
    block = _Block().eval()
    for a in (block.attn1, block.attn2, block.spatial):
        a.set_processor(AttnProcessor2_0())
    return block


def _inputs(batch: int = 2, height: int = 5, width: int = 7):
    torch.manual_seed(1)
    return torch.randn(batch, 32, height, width), torch.randn(batch, 6, 24)


def test_fused_processor_matches_diffusers():
    block = _block()
    sample, context = _inputs()
    with torch.no_grad():
        expected = block(sample, context)
        with fused_attention(block, "fused") as swapped:
            assert swapped == 3
            assert all(
                isinstance(a.processor, FusedAttnProcessor)
                for a in (block.attn1, block.attn2, block.spatial)
            )
            got = block(sample, context)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The originals are back.
    assert all(
        type(a.processor) is AttnProcessor2_0 for a in (block.attn1, block.attn2, block.spatial)
    )


def test_masks_and_other_processors_are_left_alone():
    block = _block()
    block.attn2.set_processor(torch.nn.Identity())  # any processor but AttnProcessor2_0
    with fused_attention(block, "fused") as swapped:
        assert swapped == 2
        assert isinstance(block.attn2.processor, torch.nn.Identity)
    # A mask goes to the original processor (the op would drop it).
    torch.manual_seed(2)
    tokens = torch.randn(1, 6, 32)
    mask = torch.zeros(1, 6, 6)
    mask[..., 3:] = -10000.0
    with torch.no_grad():
        expected = block.attn1(tokens, attention_mask=mask)
        with fused_attention(block, "fused"):
            got = block.attn1(tokens, attention_mask=mask)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="attention must be one of"):
        with fused_attention(block, "flash"):
            pass


def _export(tmp_path, attention: str) -> onnx.ModelProto:
    block = _block()
    sample, context = _inputs()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, sample, context):  # noqa: ANN001, ANN202
            return self.block(sample, context)

    return export_component(
        Wrapper(),
        (sample, context),
        [Io("sample", {0: "batch", 2: "height", 3: "width"}), Io("context", {0: "batch"})],
        [Io("out", {0: "batch", 2: "height", 3: "width"})],
        tmp_path / attention,
        18,
        prefix="block.",
        attention=attention,
    )


@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_export_runs_in_onnx_runtime(tmp_path, attention):
    import onnxruntime as ort

    model = _export(tmp_path, attention)
    ops = collections.Counter((n.domain, n.op_type) for n in model.graph.node)
    assert graph_attention(model) == attention
    if attention == "fused":
        assert ops[("com.microsoft", "MultiHeadAttention")] == 3
        assert ops[("", "Softmax")] == 0
        mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        heads = sorted(onnx.helper.get_attribute_value(a) for n in mha for a in n.attribute
                       if a.name == "num_heads")
        assert heads == [1, 4, 4]
    else:
        assert ops[("com.microsoft", "MultiHeadAttention")] == 0
        assert ops[("", "Softmax")] == 3
        assert all(domain == "" for domain, _ in ops)
    # Every projection keeps its parameter name (runtime LoRA patches them by name).
    names = {i.name for i in model.graph.initializer}
    block = _block()
    assert {n for n, _ in block.named_parameters()} <= names

    sample, context = _inputs(batch=1, height=9, width=11)
    with torch.no_grad():
        expected = block(sample, context).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(tmp_path / attention / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {"sample": sample.numpy(), "context": context.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_manifest_records_attention(sd15):
    components = sd15.manifest["components"]
    assert components["unet"]["attention"] == "fused"
    assert components["vae_decoder"]["attention"] == "fused"
    assert components["vae_encoder"]["attention"] == "fused"
    # CLIP's causal attention is transformers', not diffusers': left as exported.
    assert components["text_encoder"]["attention"] == "plain"
