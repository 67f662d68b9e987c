"""CLIP text encoders: `text_encoder/` and SDXL's `text_encoder_2/`.

Input `input_ids` int32 [batch, 77]. Outputs `last_hidden_state` [batch, 77, hidden] and either
`pooler_output` [batch, hidden] (CLIPTextModel) or `text_embeds` [batch, projection_dim]
(CLIPTextModelWithProjection). With `hidden_states=True` (SDXL) every hidden state is an output
too, `hidden_states.0` (embeddings) ... `hidden_states.N` (N = num_hidden_layers), because SDXL
conditions on the penultimate one.

The float outputs have the model's dtype: float16 for `convert --dtype fp16`.
"""

from __future__ import annotations

import pathlib

import onnx
import torch

from export.onnx_io import Io, export_component


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, hidden_states: bool) -> None:
        super().__init__()
        self.model = model
        self.hidden_states = hidden_states
        self.projection = hasattr(model, "text_projection")

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids.to(torch.int64), output_hidden_states=self.hidden_states, return_dict=True
        )
        pooled = out.text_embeds if self.projection else out.pooler_output
        result = (out.last_hidden_state, pooled)
        if self.hidden_states:
            result = result + tuple(out.hidden_states)
        return result


def output_names(model: torch.nn.Module, hidden_states: bool) -> list[str]:
    pooled = "text_embeds" if hasattr(model, "text_projection") else "pooler_output"
    names = ["last_hidden_state", pooled]
    if hidden_states:
        n = model.config.num_hidden_layers
        names += [f"hidden_states.{i}" for i in range(n + 1)]
    return names


def export_text_encoder(
    model: torch.nn.Module, out_dir: pathlib.Path, opset: int, hidden_states: bool
) -> onnx.ModelProto:
    seq = model.config.max_position_embeddings
    input_ids = torch.randint(0, model.config.vocab_size - 2, (2, seq), dtype=torch.int32)
    input_ids[:, -1] = model.config.vocab_size - 1
    outputs = [Io(name, {0: "batch"}) for name in output_names(model, hidden_states)]
    model_proto = export_component(
        _TextEncoder(model, hidden_states),
        (input_ids,),
        [Io("input_ids", {0: "batch"})],
        outputs,
        out_dir,
        opset,
        prefix="model.",
    )
    model.config.to_json_file(out_dir / "config.json")
    return model_proto
