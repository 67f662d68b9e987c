"""tcd-ort's Python side: ONNX export, random-weight test pipelines, diffusers reference runs.

Imports run one way, from the leaves up:

* ``errors`` (``UserError``), ``layout`` (the file names of a model directory);
* ``sources`` (hub id or local path, ``load_pipeline``), ``attention``, ``clip_vocab``;
* ``onnx_io`` (the one export call), ``segments``, ``manifest``, ``lora``, ``lora_slots``;
* the components (``text_encoder``, ``unet``, ``vae``), then the commands (``convert``,
  ``controlnet``, ``depth``, ``tiny``, ``single_file``, ``reference``);
* ``cli``, which imports each command's module only when that command runs.
"""
