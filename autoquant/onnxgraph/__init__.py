"""The ONNX graph of a quantized model (``graph.py``) and where each layer is in the float graph
(``mapping.py``): what ``export`` writes and validates, and what the ONNX Runtime backend times.
Below both, so the backend does not depend on the export command's package."""
