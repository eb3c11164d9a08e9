"""The library keeps its shape: no import cycle between subpackages, no function over 80 lines
without a stated reason, no positional parameter list over five (``tools/code_shape.py``)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_code_shape_holds():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "code_shape.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "import cycles between subpackages: 0" in done.stdout
