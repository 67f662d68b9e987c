"""File names of an exported model directory, shared by the modules that write and read it."""

# Each component's graph and, beside it, the one external data file holding its weights.
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
# The manifest at the directory's root (export/manifest.py).
MANIFEST_FILE = "tcd_ort.json"
