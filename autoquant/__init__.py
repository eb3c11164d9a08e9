"""autoquant: hardware-aware mixed-precision quantization search.

Heavy dependencies (torch, optuna, onnx, tvm) load lazily in the leaf modules that need them,
so importing this package and ``autoquant --help`` stay fast.
"""

__version__ = "0.1.0"
