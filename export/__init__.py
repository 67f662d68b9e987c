"""tcd-ort's Python side: ONNX export, random-weight test pipelines, diffusers reference runs."""
