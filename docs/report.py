"""What every experiment in docs/ shares: its two flags and the results it writes.

    args = report.parse_args(__doc__)          # --quick, --out DIR
    rep = report.Report(args, "02_rglru_anatomy", "RG-LRU anatomy")
    rep.md("Some *markdown*.")
    rep.table(["layer", "horizon"], [[0, 12.5]])
    rep.figure("02_spectrum.svg", svg.line_plot(None, ...), "the decay spectrum")
    rep.record(max_error=1e-9)                 # numbers the tests check
    rep.save()                                 # -> DIR/02_rglru_anatomy.md and .json

A full run writes into docs/results/ (committed, so the results read on the web);
--quick uses tiny settings and, unless --out is given, a fresh temporary folder,
so a quick run never overwrites the committed results.
"""
import argparse
import json
import os
import platform
import tempfile
import textwrap
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


class Report:
    def __init__(self, args, name, title):
        self.out, self.name, self.quick = args.out, name, args.quick
        self.start = time.time()
        self.parts = [f"# {title}\n"]
        self.numbers = {"quick": args.quick}

    def md(self, text):
        self.parts.append(textwrap.dedent(text).strip("\n") + "\n")

    def table(self, header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
        self.parts.append("\n".join(lines) + "\n")

    def figure(self, filename, svg_text, caption):
        """Write an SVG beside the report and link it."""
        with open(os.path.join(self.out, filename), "w", encoding="utf-8") as f:
            f.write(svg_text)
        self.parts.append(f"![{caption}]({filename})\n")

    def record(self, **numbers):
        self.numbers.update(numbers)

    def save(self):
        import numba
        import numpy
        elapsed = time.time() - self.start
        self.numbers["elapsed_s"] = round(elapsed, 1)
        script = f"docs/{self.name}.py" + (" --quick" if self.quick else "")
        blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
        threads = f"{numba.get_num_threads()} Numba thread(s), BLAS threads {blas}"
        self.parts.append(f"---\nWritten by `python {script}` in {elapsed:.0f} s on {os.cpu_count()} cores, {threads} "
                          f"({platform.machine()}, Python {platform.python_version()}, NumPy {numpy.__version__}, "
                          f"Numba {numba.__version__}), {time.strftime('%Y-%m-%d')}.\n")
        self.numbers["numba_threads"] = numba.get_num_threads()
        path = os.path.join(self.out, f"{self.name}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.parts))
        with open(os.path.join(self.out, f"{self.name}.json"), "w", encoding="utf-8") as f:
            json.dump(self.numbers, f, indent=1, default=float)
        print(f"wrote {path} ({elapsed:.0f} s)")
        return path
