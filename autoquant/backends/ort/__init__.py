"""The ONNX Runtime backend: per-layer and whole-model timings of the exported graph."""
