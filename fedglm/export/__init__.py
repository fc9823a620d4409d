"""Serving formats of the final model: ONNX (fp32, INT8, FP16) and a TensorRT engine.

`onnx.py` exports with torch's dynamo exporter (dynamic batch and sequence axes), derives the
INT8 (dynamic, per-channel) and FP16 variants, and checks each against torch in ONNX Runtime on
held-out text. `tensorrt.py` builds an engine where `tensorrt` and a GPU are present; it is
imported lazily, so nothing here needs TensorRT to load.
"""
