"""Scatter plots and heat maps as inline SVG: the report works offline with no plotting library.

Every mark carries its data (``data-*`` attributes and a ``<title>`` tooltip), so hovering shows a
config and the page script can show the full config on click.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoquant.report.escape import html_text

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
BIT_COLOURS = {2: "#67001f", 3: "#d6604d", 4: "#f4a582", 8: "#92c5de", 16: "#4393c3", 32: "#bdbdbd"}


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    tooltip: str
    key: str = ""  # e.g. "run/trial": the page script looks the config up by it


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]
    colour: str
    kind: str = "dots"  # dots | front (dots joined by a staircase) | line (straight segments)
    marker: str = "circle"  # circle | square | triangle | ring
    size: float = 4.0


@dataclass(frozen=True)
class Axis:
    label: str
    log: bool = False
    scale: float = 1.0  # shown value = value * scale


@dataclass
class _Frame:
    width: int = 780
    height: int = 380
    left: int = 70
    right: int = 170
    top: int = 20
    bottom: int = 50
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        start, stop = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [m * 10**e for e in range(start, stop + 1) for m in (1, 2, 5)]
        return [t for t in ticks if lo <= t <= hi] or [lo, hi]
    span = hi - lo or abs(hi) or 1.0
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


@dataclass(frozen=True)
class _Plot:
    """Where values land: the frame and the padded data ranges of a scatter plot."""

    x: Axis
    y: Axis
    xlo: float
    xhi: float
    ylo: float
    yhi: float
    f: _Frame = field(default_factory=_Frame)

    @classmethod
    def fit(cls, pts: list[tuple[float, float]], x: Axis, y: Axis) -> _Plot:
        """Ranges around the (shown) values ``pts``, padded so no mark sits on the border."""
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
        if x.log:
            xlo, xhi = xlo / 1.15, xhi * 1.15
        else:
            pad = (xhi - xlo) * 0.05 or abs(xhi) * 0.05 or 1
            xlo, xhi = xlo - pad, xhi + pad
        pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.02 or 0.01
        return cls(x, y, xlo, xhi, ylo - pad, yhi + pad)

    @property
    def pw(self) -> int:
        return self.f.width - self.f.left - self.f.right

    @property
    def ph(self) -> int:
        return self.f.height - self.f.top - self.f.bottom

    def sx(self, v: float) -> float:
        f, pw, xlo, xhi = self.f, self.pw, self.xlo, self.xhi
        if self.x.log:
            return f.left + (math.log10(v) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * pw
        return f.left + (v - xlo) / (xhi - xlo) * pw

    def sy(self, v: float) -> float:
        return self.f.top + self.ph - (v - self.ylo) / (self.yhi - self.ylo) * self.ph

    def at(self, p: Point) -> tuple[float, float]:
        """A point's position (its value times the axis' scale)."""
        return self.sx(p.x * self.x.scale), self.sy(p.y * self.y.scale)


def scatter(series: list[Series], x: Axis, y: Axis, *, title: str, plot_id: str) -> str:
    pts = [(p.x * x.scale, p.y * y.scale) for s in series for p in s.points]
    pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b) and (not x.log or a > 0)]
    if not pts:
        return f'<p class="empty">{html_text(title)}: no points to plot</p>'
    plot = _Plot.fit(pts, x, y)
    f, pw, ph = plot.f, plot.pw, plot.ph
    out = [
        f'<svg class="plot" id="{html_text(plot_id)}" viewBox="0 0 {f.width} {f.height}" width="{f.width}" '
        f'height="{f.height}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html_text(title)}">',
        f'<rect x="{f.left}" y="{f.top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
        *_grid(plot),
    ]
    for i, s in enumerate(series):
        out += _series_marks(plot, s)
        out.append(
            f'<text x="{f.left + pw + 10}" y="{f.top + 14 + 14 * i}" font-size="11" fill="{html_text(s.colour)}">'
            f"{html_text(s.name)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _grid(plot: _Plot) -> list[str]:
    """Tick lines and labels of both axes, and the axis titles."""
    f, pw, ph, x, y = plot.f, plot.pw, plot.ph, plot.x, plot.y
    out = []
    for t in _ticks(plot.xlo, plot.xhi, x.log):
        px = plot.sx(t)
        out.append(f'<line x1="{px:.1f}" y1="{f.top}" x2="{px:.1f}" y2="{f.top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px:.1f}" y="{f.top + ph + 16}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
    for t in _ticks(plot.ylo, plot.yhi, False):
        py = plot.sy(t)
        out.append(f'<line x1="{f.left}" y1="{py:.1f}" x2="{f.left + pw}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{f.left - 6}" y="{py + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    out.append(
        f'<text x="{f.left + pw / 2}" y="{f.height - 10}" text-anchor="middle" font-size="12">'
        f'{html_text(x.label)}{" (log scale)" if x.log else ""}</text>'
    )
    out.append(
        f'<text transform="translate(16 {f.top + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{html_text(y.label)}</text>'
    )
    return out


def _series_marks(plot: _Plot, s: Series) -> list[str]:
    """One series: its reference line, or its front's staircase, and a mark per point."""
    x = plot.x
    good = [p for p in s.points if math.isfinite(p.x) and math.isfinite(p.y) and (not x.log or p.x > 0)]
    out = []
    if s.kind == "line" and len(good) > 1:
        ordered = sorted(good, key=lambda p: p.x)
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{px:.1f} {py:.1f}"
            for i, (px, py) in enumerate(map(plot.at, ordered))
        )
        out.append(f'<path d="{path}" fill="none" stroke="{html_text(s.colour)}" stroke-dasharray="4 3"/>')
        good = []  # a reference line, not data: no marks
    if s.kind == "front" and len(good) > 1:
        ordered = sorted(good, key=lambda p: p.x)
        fx, fy = plot.at(ordered[0])
        path = [f"M{fx:.1f} {fy:.1f}"]
        for p in ordered[1:]:
            px, py = plot.at(p)
            path.append(f"H{px:.1f} V{py:.1f}")
        out.append(f'<path d="{" ".join(path)}" fill="none" stroke="{html_text(s.colour)}" stroke-width="1.5" opacity="0.7"/>')
    out += [_marker(s, p, *plot.at(p)) for p in good]
    return out


def _marker(s: Series, p: Point, px: float, py: float) -> str:
    """The point's mark in its series' shape, carrying its key, series and tooltip."""
    attrs = f'class="pt" data-key="{html_text(p.key)}" data-series="{html_text(s.name)}"'
    tip = f"<title>{html_text(p.tooltip)}</title>"
    if s.marker == "square":
        r = s.size + 1
        return f'<rect {attrs} x="{px - r:.1f}" y="{py - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{html_text(s.colour)}">{tip}</rect>'
    if s.marker == "triangle":
        r = s.size + 2
        return f'<polygon {attrs} points="{px:.1f},{py - r:.1f} {px - r:.1f},{py + r:.1f} {px + r:.1f},{py + r:.1f}" fill="{html_text(s.colour)}">{tip}</polygon>'
    if s.marker == "ring":
        return f'<circle {attrs} cx="{px:.1f}" cy="{py:.1f}" r="{s.size + 4}" fill="none" stroke="{html_text(s.colour)}" stroke-width="2">{tip}</circle>'
    return f'<circle {attrs} cx="{px:.1f}" cy="{py:.1f}" r="{s.size}" fill="{html_text(s.colour)}" fill-opacity="0.8">{tip}</circle>'


def heatmap(rows: list[str], cols: list[str], cells: dict[tuple[str, str], tuple[int, str]], *, title: str, plot_id: str) -> str:
    """Rows × columns of labelled cells; ``cells[(row, col)] = (bits, label)`` colours by bits."""
    cw, ch, left, top = 64, 22, 110, 40
    width, height = max(left + cw * len(cols) + 10, left + 78 * len(BIT_COLOURS)), top + ch * len(rows) + 40
    out = [
        f'<svg class="plot" id="{html_text(plot_id)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html_text(title)}">'
    ]
    for j, col in enumerate(cols):
        out.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 8}" text-anchor="middle" font-size="10">{html_text(col)}</text>')
    for i, row in enumerate(rows):
        out.append(f'<text x="{left - 6}" y="{top + i * ch + 15}" text-anchor="end" font-size="11">{html_text(row)}</text>')
        for j, col in enumerate(cols):
            bits, label = cells.get((row, col), (32, "-"))
            colour = BIT_COLOURS.get(bits, "#fff")
            out.append(
                f'<rect x="{left + j * cw}" y="{top + i * ch}" width="{cw - 2}" height="{ch - 2}" fill="{colour}">'
                f"<title>{html_text(row)} @ {html_text(col)}: {html_text(label)}</title></rect>"
            )
            ink = "#fff" if bits in (2, 3, 16) else "#000"
            out.append(f'<text x="{left + j * cw + cw / 2 - 1}" y="{top + i * ch + 14}" text-anchor="middle" font-size="9" fill="{ink}">{html_text(label)}</text>')
    lx = left
    ly = top + ch * len(rows) + 16
    for bits, colour in BIT_COLOURS.items():
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 10}" font-size="10">{bits}-bit{" float" if bits >= 16 else ""}</text>')
        lx += 78
    out.append("</svg>")
    return "\n".join(out)
