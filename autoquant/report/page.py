"""The HTML shell shared by the run report and the comparison: inline CSS and script, no
external request (no CDN, no fonts, no images from the network). The Content Security Policy
allows exactly the page's own style and script, by their hashes: markup that slipped past escaping
still cannot run."""

from __future__ import annotations

import base64
import hashlib

from autoquant.report.escape import html_text, json_for_script

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.sel { background: #fff3c4; } tr.click { cursor: pointer; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.pt { cursor: pointer; } .pt:hover { stroke: #000; stroke-width: 1.5; }
pre { background: #f6f6f6; padding: 10px; font-size: 11px; overflow: auto; max-height: 420px; }
.note { color: #555; font-size: 13px; } .src { color: #777; font-size: 11px; }
#detail { min-height: 40px; }
"""

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('configs').textContent);
  const detail = document.getElementById('detail');
  function show(key) {
    const item = data[key];
    if (!item || !detail) return;
    detail.textContent = key + '\\n' + JSON.stringify(item, null, 2);
    document.querySelectorAll('tr.sel').forEach(function (r) { r.classList.remove('sel'); });
    document.querySelectorAll('tr[data-key="' + CSS.escape(key) + '"]').forEach(function (r) { r.classList.add('sel'); });
  }
  document.querySelectorAll('.pt, tr.click').forEach(function (el) {
    el.addEventListener('click', function () { show(el.getAttribute('data-key')); });
  });
  const marks = document.querySelectorAll('svg.plot .pt, svg.plot rect').length;
  document.body.setAttribute('data-rendered-marks', String(marks));
})();
"""


def csp_source(text: str) -> str:
    """The CSP source that allows one inline ``<style>`` or ``<script>`` whose text is ``text``."""
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


def content_security_policy() -> str:
    # A JSON data block (type application/json) is never executed, so it needs no source.
    return (f"default-src 'none'; style-src {csp_source(CSS)}; script-src {csp_source(SCRIPT)}; "
            "base-uri 'none'; form-action 'none'")


def page(title: str, body: str, configs: dict[str, object]) -> str:
    """``body`` is markup built from escaped parts; ``title`` and ``configs`` are escaped here."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{content_security_policy()}\">"
        f"<title>{html_text(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
        "<h2>Selected point</h2><p class='note'>Click a point or a table row to see its full config.</p>"
        "<pre id='detail'></pre>\n"
        f"<script type='application/json' id='configs'>{json_for_script(configs)}</script>\n"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def table(headers: list[str], rows: list[list[object]], *, left: int = 1, keys: list[str] | None = None) -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html_text(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f"<td class='{'l' if i < left else ''}'>{html_text(v)}</td>" for i, v in enumerate(row))
        attrs = f" class='click' data-key='{html_text(keys[r])}'" if keys else ""
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
