"""The TVM backend: hand-scheduled and tuned per-layer kernels, whole models, RPC devices."""
