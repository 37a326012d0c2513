"""ONNX export of the model and an onnxruntime backend for the predictor.

Needs the optional dependencies ``onnx`` and ``onnxruntime`` (``pip install segany[onnx]``).
"""

from .onnx import export_context, export_decoder, export_encoder, export_onnx, export_prompt

__all__ = ["export_context", "export_decoder", "export_encoder", "export_onnx", "export_prompt"]
