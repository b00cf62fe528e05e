"""Quantization: embedding codecs and search over codes (``embeddings``, ``search``), and model
weight + activation quantization (FP8 E4M3, INT8 SmoothQuant W8A8: ``recipes``, ``calibration``,
``weights``; the ONNX Q/DQ writer is :mod:`jev4.export.onnx_qdq`).
"""
