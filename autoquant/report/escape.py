"""The one way a value reaches a page: as HTML text or attribute, or as JSON inside a script.

Run names come from directory names and spec.yaml, layer names from the model, and a run directory
may be shared: every one of them is hostile markup until escaped here.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

# Inside <script>, the HTML tokenizer still looks for "</script" and "<!--"; JSON's \u escapes
# keep both out of the text and decode to the same strings. U+2028/9 end a line in older JS.
_SCRIPT_UNSAFE = str.maketrans({
    "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029",
})


def html_text(value: object) -> str:
    """``value`` as HTML text or as a quoted attribute value (HTML or SVG): ``& < > " '`` escaped."""
    return escape(str(value), quote=True)


def json_for_script(value: Any) -> str:
    """``value`` as JSON that can sit inside a ``<script>`` element: no character of it can end
    the element, open a comment or a tag; ``JSON.parse`` of the element's text gives ``value``."""
    return json.dumps(value, sort_keys=True, default=str).translate(_SCRIPT_UNSAFE)


__all__ = ["html_text", "json_for_script"]
