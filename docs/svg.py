"""Small SVG charts and diagrams with the standard library only.

    import svg
    svg.line_plot("loss.svg", [{"label": "train", "x": steps, "y": losses},
                               {"label": "held-out", "x": evals, "y": val, "marker": True}],
                  title="Loss", xlabel="step", ylabel="cross-entropy (nats)")
    svg.bar_chart("speed.svg", ["nano", "tiny"], [{"label": "tok/s", "values": [9000, 2000]}], logy=True)

`line_plot` draws several series on linear or log axes, with ticks, labels and a
legend; `bar_chart` draws grouped bars; `Canvas` is the drawing surface both use,
and what the architecture figures are drawn on. Each returns the SVG text and
writes it when given a path. Nothing here knows about Wyrd.
"""
import math
import numbers
import os
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


class Canvas:
    """A list of SVG elements in user units (pixels), y pointing down."""

    def __init__(self, width, height, background="white"):
        self.width, self.height = width, height
        self.items = []
        if background:
            self.rect(0, 0, width, height, fill=background, stroke="none")

    def line(self, x1, y1, x2, y2, color="#333", width=1.0, dash=None):
        self.items.append(f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="{color}" '
                          f'stroke-width="{width}"{_dash(dash)}/>')

    def polyline(self, points, color="#333", width=1.5, dash=None):
        if len(points) >= 2:
            pts = " ".join(f"{x:.2f},{y:.2f}" for x, y in points)
            self.items.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}" '
                              f'stroke-linejoin="round"{_dash(dash)}/>')

    def rect(self, x, y, w, h, fill="none", stroke="#333", width=1.0, rx=0, opacity=None):
        op = f' fill-opacity="{opacity}"' if opacity is not None else ""
        self.items.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" rx="{rx}" '
                          f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"{op}/>')

    def circle(self, x, y, r, fill="#333", stroke="none"):
        self.items.append(f'<circle cx="{x:.2f}" cy="{y:.2f}" r="{r}" fill="{fill}" stroke="{stroke}"/>')

    def text(self, x, y, s, size=12, anchor="start", color="#222", weight="normal", rotate=None,
             family=FONT, baseline="auto"):
        rot = f' transform="rotate({rotate} {x:.2f} {y:.2f})"' if rotate else ""
        base = f' dominant-baseline="{baseline}"' if baseline != "auto" else ""
        self.items.append(f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" font-family="{family}" '
                          f'text-anchor="{anchor}" fill="{color}" font-weight="{weight}" '
                          f'xml:space="preserve"{base}{rot}>'
                          f'{escape(str(s))}</text>')

    def arrow(self, x1, y1, x2, y2, color="#333", width=1.2, head=6.0):
        """A line with a filled triangular head at (x2, y2)."""
        self.line(x1, y1, x2, y2, color, width)
        ang = math.atan2(y2 - y1, x2 - x1)
        left = (x2 - head * math.cos(ang - 0.4), y2 - head * math.sin(ang - 0.4))
        right = (x2 - head * math.cos(ang + 0.4), y2 - head * math.sin(ang + 0.4))
        self.items.append(f'<polygon points="{x2:.2f},{y2:.2f} {left[0]:.2f},{left[1]:.2f} '
                          f'{right[0]:.2f},{right[1]:.2f}" fill="{color}"/>')

    def box(self, x, y, w, h, label, fill="#eef", stroke="#335", size=12, sublabel=None, weight="normal"):
        """A rounded box with a centred label (and an optional smaller second line)."""
        self.rect(x, y, w, h, fill=fill, stroke=stroke, rx=5)
        if sublabel:
            self.text(x + w / 2, y + h / 2 - 2, label, size, "middle", weight=weight)
            self.text(x + w / 2, y + h / 2 + size - 1, sublabel, size - 2, "middle", color="#555")
        else:
            self.text(x + w / 2, y + h / 2 + size * 0.35, label, size, "middle", weight=weight)

    def clip(self, x, y, w, h):
        """Clip what is drawn next to a rectangle, until end_clip()."""
        n = sum(item.startswith("<clipPath") for item in self.items)
        self.items.append(f'<clipPath id="clip{n}"><rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}"/>'
                          f'</clipPath>')
        self.items.append(f'<g clip-path="url(#clip{n})">')

    def end_clip(self):
        self.items.append("</g>")

    def to_svg(self):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}">\n' + "\n".join(self.items) + "\n</svg>\n")

    def save(self, path):
        text = self.to_svg()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


def _dash(dash):
    return f' stroke-dasharray="{dash}"' if dash else ""


# -- axes ------------------------------------------------------------------------

def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    if ticks[0] < lo - step * 1e-9:
        ticks = ticks[1:]
    return ticks


def log_ticks(lo, hi):
    """Powers of ten in [lo, hi] (lo, hi > 0); with fewer than two decades, also 2x and 5x."""
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    ticks = [10.0 ** k for k in range(a, b + 1) if lo * (1 - 1e-9) <= 10.0 ** k <= hi * (1 + 1e-9)]
    if b - a > 8:  # too many decades: every second one
        ticks = ticks[::2]
    if len(ticks) < 3:
        ticks = sorted(m * 10.0 ** k for k in range(a - 1, b + 1) for m in (1, 2, 5)
                       if lo * (1 - 1e-9) <= m * 10.0 ** k <= hi * (1 + 1e-9))
    return ticks


def fmt_number(v):
    """Short tick label: 0.001, 0.5, 20, 1500, 1e+06 -> '1M'-style suffixes above 10,000."""
    if v == 0:
        return "0"
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div * 10 or (a >= div and (a / div) == int(a / div)):
            return f"{v / div:g}{suffix}"
    if a < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def fmt_bytes(v):
    """Tick label in bytes with decimal units (so log ticks read 1 kB, 10 MB, 1 GB)."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.3g} B"


class Axis:
    """Maps data values to pixels along one direction, linear or log10."""

    def __init__(self, lo, hi, p0, p1, log=False):
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v):
        if self.log:
            v = math.log10(v)
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def _finite(v, log):
    return isinstance(v, numbers.Real) and math.isfinite(v) and (v > 0 or not log)


def _limits(values, log, given, pad):
    if given:
        return given
    vals = [v for v in values if _finite(v, log)]
    if not vals:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        return lo / (1 + pad * 2), hi * (1 + pad * 2)
    span = (hi - lo) or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


class _Frame:
    """Title, plot rectangle, ticks, grid and axis labels of one chart."""

    def __init__(self, width, height, title, xlabel, ylabel, ylabels=(), legend_above=0):
        self.c = Canvas(width, height)
        widest = max((len(s) for s in ylabels), default=3)
        self.left = 34 + 6.5 * widest  # room for the widest tick label and the axis label
        self.right, self.bottom = width - 20, height - 52
        self.top = (40 if title else 16) + 20 * legend_above
        if title:
            self.c.text(width / 2, 24, title, 15, "middle", weight="bold")
        if xlabel:
            self.c.text((self.left + self.right) / 2, height - 12, xlabel, 12, "middle")
        if ylabel:
            self.c.text(16, (self.top + self.bottom) / 2, ylabel, 12, "middle", rotate=-90)

    def y_axis(self, ax, ticks, fmt):
        for t in ticks:
            y = ax(t)
            self.c.line(self.left, y, self.right, y, "#e4e4e4", 1)
            self.c.text(self.left - 6, y + 4, fmt(t), 11, "end", color="#444")

    def x_axis(self, ax, ticks, fmt):
        for t in ticks:
            x = ax(t)
            self.c.line(x, self.top, x, self.bottom, "#efefef", 1)
            self.c.text(x, self.bottom + 16, fmt(t), 11, "middle", color="#444")

    def border(self):
        self.c.rect(self.left, self.top, self.right - self.left, self.bottom - self.top, stroke="#555")

    def legend(self, entries, where):
        """entries: (label, color, dash, kind) with kind 'line' or 'bar'; where is
        'above' (one row between title and plot) or e.g. 'top right', 'bottom left'."""
        if not entries:
            return
        if where == "above":
            x, y = self.left, self.top - 12
            for label, color, dash, kind in entries:
                self._key(x, y, color, dash, kind)
                self.c.text(x + 24, y, label, 11)
                x += 40 + 6.5 * len(str(label))
            return
        w = 34 + 7.0 * max(len(str(e[0])) for e in entries)
        h = 8 + 18 * len(entries)
        x = self.right - w - 8 if "right" in where else self.left + 8
        y = self.top + 8 if "top" in where else self.bottom - h - 8
        self.c.rect(x, y, w, h, fill="white", stroke="#bbb", opacity=0.85)
        for i, (label, color, dash, kind) in enumerate(entries):
            yy = y + 15 + 18 * i
            self._key(x + 6, yy, color, dash, kind)
            self.c.text(x + 30, yy, label, 11)

    def _key(self, x, y, color, dash, kind):
        if kind == "bar":
            self.c.rect(x + 2, y - 8, 16, 10, fill=color, stroke="none")
        else:
            self.c.line(x, y - 4, x + 20, y - 4, color, 2.2, dash)


def line_plot(path, series, title="", xlabel="", ylabel="", logx=False, logy=False, width=640, height=400,
              xlim=None, ylim=None, legend="top right", xfmt=fmt_number, yfmt=fmt_number, hlines=(), vlines=()):
    """Several series as lines (and optional markers) on shared axes.

    series: list of dicts {"label", "x", "y"} with optional "color", "dash" (e.g. "6 4"),
    "marker" (True: a dot per point), "width". Points that are None, NaN or (on a log
    axis) not positive are skipped and break the line. hlines, vlines: (value, label)
    dashed reference lines across the plot.
    """
    xs = [v for s in series for v in s["x"]]
    ys = [v for s in series for v in s["y"]] + [h[0] for h in hlines]
    xlim = _limits(xs, logx, xlim, 0.0 if not logx else 0.0)
    ylim = _limits(ys, logy, ylim, 0.05)
    yticks = log_ticks(*ylim) if logy else nice_ticks(*ylim)
    f = _Frame(width, height, title, xlabel, ylabel, [yfmt(t) for t in yticks],
               legend_above=legend == "above" and any(s.get("label") for s in series))
    ax, ay = Axis(*xlim, f.left, f.right, logx), Axis(*ylim, f.bottom, f.top, logy)
    f.y_axis(ay, yticks, yfmt)
    f.x_axis(ax, log_ticks(*xlim) if logx else nice_ticks(*xlim, n=6), xfmt)
    for y, label in hlines:
        if _finite(y, logy):
            f.c.line(f.left, ay(y), f.right, ay(y), "#888", 1, "4 3")
            f.c.text(f.right - 6, ay(y) - 4, label, 10, "end", color="#666")
    for x, label in vlines:
        if _finite(x, logx):
            f.c.line(ax(x), f.top, ax(x), f.bottom, "#888", 1, "4 3")
            f.c.text(ax(x) + 4, f.bottom - 6, label, 10, color="#666")
    entries = []
    f.c.clip(f.left, f.top, f.right - f.left, f.bottom - f.top)  # values outside xlim/ylim are cut off
    for i, s in enumerate(series):
        color = s.get("color", PALETTE[i % len(PALETTE)])
        run = []
        for x, y in zip(s["x"], s["y"]):
            if _finite(x, logx) and _finite(y, logy):
                run.append((ax(x), ay(y)))
                continue
            f.c.polyline(run, color, s.get("width", 2), s.get("dash"))
            run = []
        f.c.polyline(run, color, s.get("width", 2), s.get("dash"))
        if s.get("label"):
            entries.append((s["label"], color, s.get("dash"), "line"))
    f.c.end_clip()
    for i, s in enumerate(series):  # markers outside the clip, so none is cut in half at the edge
        inside = lambda px, lo, hi: min(lo, hi) - 0.5 <= px <= max(lo, hi) + 0.5
        for x, y in zip(s["x"], s["y"]) if s.get("marker") else ():
            if _finite(x, logx) and _finite(y, logy) and inside(ax(x), f.left, f.right) \
                    and inside(ay(y), f.top, f.bottom):
                f.c.circle(ax(x), ay(y), 3, s.get("color", PALETTE[i % len(PALETTE)]))
    f.border()
    f.legend(entries, legend)
    return f.c.save(path)


def bar_chart(path, categories, series, title="", ylabel="", logy=False, width=640, height=400,
              ylim=None, legend="above", yfmt=fmt_number, value_labels=True, value_fmt="{:.3g}"):
    """Grouped vertical bars: one group per category, one bar per series.

    series: list of dicts {"label", "values"} (values aligned with categories), optional "color".
    """
    vals = [v for s in series for v in s["values"]]
    if ylim is None:
        lo, hi = _limits(vals + ([] if logy else [0.0]), logy, None, 0.0)
        # log bars grow from a third of the smallest value, so the smallest bar is still visible
        ylim = (lo / 3, hi * 1.6) if logy else (min(lo, 0.0), hi + 0.1 * (hi - min(lo, 0.0)))
    yticks = log_ticks(*ylim) if logy else nice_ticks(*ylim)
    f = _Frame(width, height, title, "", ylabel, [yfmt(t) for t in yticks],
               legend_above=legend == "above" and len(series) > 1)
    ay = Axis(*ylim, f.bottom, f.top, logy)
    f.y_axis(ay, yticks, yfmt)
    group = (f.right - f.left) / max(len(categories), 1)
    bar = group * 0.8 / max(len(series), 1)
    base = f.bottom if logy else ay(max(ylim[0], 0.0))
    for j, s in enumerate(series):
        color = s.get("color", PALETTE[j % len(PALETTE)])
        for i, v in enumerate(s["values"]):
            if not _finite(v, logy):
                continue
            x = f.left + group * i + group * 0.1 + bar * j
            y = ay(v)
            f.c.rect(x, min(y, base), bar * 0.92, abs(base - y), fill=color, stroke="none")
            if value_labels:
                f.c.text(x + bar * 0.46, min(y, base) - 4, value_fmt.format(v), 10, "middle", color="#333")
    for i, cat in enumerate(categories):
        f.c.text(f.left + group * (i + 0.5), f.bottom + 16, cat, 11, "middle")
    f.border()
    f.legend([(s["label"], s.get("color", PALETTE[j % len(PALETTE)]), None, "bar")
              for j, s in enumerate(series) if s.get("label") and len(series) > 1], legend)
    return f.c.save(path)
