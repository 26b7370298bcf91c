"""Quantization: rules, numerics, quantized kernels, storage."""
