"""What every experiment in docs/ shares: its flags, and the page it writes.

    import report                               # first: the repo root on sys.path
    args = report.parse_args(__doc__)           # --quick, --out DIR
    rep = report.Report(args, "02_rglru_anatomy")
    rep.table(["layer", "horizon"], [[0, 12.5]])
    rep.figure("02_spectrum.svg", svg.line_plot(None, ...), "the decay spectrum")
    rep.md(f"the median horizon is {h:.1f} tokens")  # text that carries results
    rep.record(max_error=1e-9)                  # numbers the tests check
    rep.save()                                  # -> DIR/02_rglru_anatomy.md and .json

The prose is written once, in the script's `# %% [markdown]` cells. The page is
those cells in order, each followed by the results (tables, figures, text) that
the code after it produced, so the page reads as the notebook does. Under IPython
(Jupyter, VS Code) each result is also shown inline as it is made.

A full run writes into docs/results/ (committed, so the results read on the web);
--quick uses tiny settings and, unless --out is given, a fresh temporary folder,
so a quick run never overwrites the committed results.
"""
import argparse
import json
import linecache
import os
import platform
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path[1:1] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "bench")]  # wyrd, ...; bench/
from runtime import atomic_write  # noqa: E402


def parse_args(description, extra=()):
    """The shared flags, plus `extra`: (flag, help) pairs of an experiment's own string options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings, a few seconds (what the tests run)")
    for flag, help in extra:
        p.add_argument(flag, help=help)
    p.add_argument("--out", default=None, help="folder for the .md/.svg/.json results "
                   "(default: docs/results, or a temporary folder with --quick)")
    # parse_known_args: inside Jupyter the kernel adds its own flags (-f kernel.json)
    args, _ = p.parse_known_args()
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="wyrd-docs-") if args.quick else RESULTS
    os.makedirs(args.out, exist_ok=True)
    return args


def fmt(v, digits=4):
    """A number for a Markdown table: 4 significant digits, thousands separated."""
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    if v != v:
        return "n/a"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def markdown_cells(lines):
    """-> [(line number, text)] of the `# %% [markdown]` cells of a percent-format script."""
    cells = []
    for i, line in enumerate(lines):
        if line.startswith("# %% [markdown]"):
            body = []
            for text in lines[i + 1:]:
                if not text.startswith("#") or text.startswith("# %%"):
                    break
                body.append(text[2:] if text.startswith("# ") else "")
            cells.append((i + 1, "\n".join(body).strip("\n") + "\n"))
    return cells


def _show(kind, payload):
    """Display inline when running under IPython; never import it otherwise."""
    ipython = sys.modules.get("IPython")
    if ipython is None or ipython.get_ipython() is None:
        return
    from IPython.display import SVG, Markdown, display
    display(SVG(payload) if kind == "svg" else Markdown(payload))


class Report:
    def __init__(self, args, name):
        self.out, self.name, self.quick = args.out, name, args.quick
        self.start = time.time()
        self.script = os.path.join(HERE, name + ".py")
        with open(self.script, encoding="utf-8") as f:
            self.lines = f.read().splitlines()
        self.results = []  # (script line of the call that made it, markdown)
        self.cursor = 0
        self.numbers = {"quick": args.quick}

    def _line(self):
        """The script line of the rep.* call: the caller's own line when run as a script;
        under Jupyter the cell is compiled elsewhere, so find the same source line in the
        script (searching on from the last one found, so a repeated line keeps its place)."""
        frame = sys._getframe(1)
        while frame.f_code.co_filename == __file__:
            frame = frame.f_back
        if os.path.abspath(frame.f_code.co_filename) == self.script:
            return frame.f_lineno
        text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        for i in list(range(self.cursor, len(self.lines))) + list(range(self.cursor)):
            if text and self.lines[i].strip() == text:
                self.cursor = i
                return i + 1
        return self.cursor + 1

    def _add(self, markdown, kind="md", payload=None):
        self.results.append((self._line(), markdown))
        _show(kind, payload or markdown)

    def md(self, text):
        self._add(textwrap.dedent(text).strip("\n") + "\n")

    def table(self, header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
        self._add("\n".join(lines) + "\n")

    def figure(self, filename, svg_text, caption):
        """Write an SVG beside the report and link it."""
        with atomic_write(os.path.join(self.out, filename), "w") as f:
            f.write(svg_text)
        self._add(f"![{caption}]({filename})\n", "svg", svg_text)

    def record(self, **numbers):
        self.numbers.update(numbers)

    def page(self):
        """The markdown cells in order, each followed by the results made after it."""
        cells = markdown_cells(self.lines)
        starts = [line for line, _ in cells] + [len(self.lines) + 1]
        parts = [text for line, text in self.results if line < starts[0]]
        for (start, text), end in zip(cells, starts[1:]):
            parts.append(text)
            parts += [r for line, r in self.results if start <= line < end]
        return parts

    def save(self):
        import numba
        import numpy
        elapsed = time.time() - self.start
        self.numbers["elapsed_s"] = round(elapsed, 1)
        self.numbers["numba_threads"] = numba.get_num_threads()
        script = f"docs/{self.name}.py" + (" --quick" if self.quick else "")
        blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
        threads = f"{numba.get_num_threads()} Numba thread(s), BLAS threads {blas}"
        footer = (f"---\nWritten by `python {script}` in {elapsed:.0f} s on {os.cpu_count()} cores, {threads} "
                  f"({platform.machine()}, Python {platform.python_version()}, NumPy {numpy.__version__}, "
                  f"Numba {numba.__version__}), {time.strftime('%Y-%m-%d')}.\n")
        path = os.path.join(self.out, f"{self.name}.md")
        with atomic_write(path, "w") as f:
            f.write("\n".join(self.page() + [footer]))
        with atomic_write(os.path.join(self.out, f"{self.name}.json"), "w") as f:
            json.dump(self.numbers, f, indent=1, default=float)
        print(f"wrote {path} ({elapsed:.0f} s)")
        return path
