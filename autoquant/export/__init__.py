"""ONNX export of a front point, validated in ONNX Runtime.

One module per concept: ``pick`` (which front row), ``graph`` (the quantized ONNX graph),
``validate`` (checker, ORT at two levels, agreement, metric, latency), ``manifest``
(``manifest.json``), ``pipeline`` (pick → graph → validate → manifest, ``--all``) and
``command`` (the ``autoquant export`` typer command). onnx and onnxruntime load lazily.
"""
