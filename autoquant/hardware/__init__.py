"""What a target is: the hardware profile schema (``profile.py``), the kernel formats a target
can run (``kernels.py``), and the one lazy TVM import (``_tvm.py``, which ``mcpu: auto`` needs).
Nothing here measures anything."""
