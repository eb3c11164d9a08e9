"""Latency backends: the contract (``contract.py``), the registry keyed by a profile's runtime
(``registry.py``), what whole-model timings feed a model (``inputs.py``), and one subpackage per
runtime (``tvm/``, ``ort/``). Nothing here imports TVM or ONNX Runtime at package import."""
