"""Headless Chromium (Debian's package) for page tests: no network, console captured."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)"
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
    # Every request that is not the page's own file fails, so a page that needs the network breaks.
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
]


@dataclass(frozen=True)
class Rendered:
    dom: str
    console: list[str]
    screenshot: Path


def render(page: Path, tmp: Path, *, size: str = "1300,2200", screenshot: bool = True) -> Rendered:
    assert CHROMIUM is not None
    profile = tmp / "chromium-profile"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]
    url = page.resolve().as_uri()
    dumped = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = tmp / f"{page.stem}.png"
    if screenshot:  # a second browser start: skipped by tests that only read the DOM
        subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    console = [line for line in dumped.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return Rendered(dumped.stdout, console, shot)
