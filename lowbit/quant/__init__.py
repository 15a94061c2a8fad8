"""Quantization: affine maths, calibration observers, int8 modules, PTQ and QAT."""
