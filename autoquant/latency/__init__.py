"""Per-layer latency: the table of timings (``table.py``), profiling that fills it
(``profiling.py``), the additive model calibrated on whole-model timings (``model.py``) and its
validation against fresh measurements (``validation.py``)."""
