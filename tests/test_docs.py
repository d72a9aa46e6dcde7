"""docs/ stays true: every experiment runs (in --quick mode) and its results hold
the numbers it claims, the architecture figures match their generator, and
architecture.md cites only code that exists."""
import ast
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def run_experiment(name, out):
    """python docs/NAME.py --quick --out OUT -> (markdown text, recorded numbers)."""
    # One thread each for Numba and BLAS: on a loaded machine, parallel regions wait for
    # descheduled threads and a quick run slows down several times; these are smoke runs.
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(DOCS, f"{name}.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(out, f"{name}.md"), encoding="utf-8") as f:
        md = f.read()
    with open(os.path.join(out, f"{name}.json"), encoding="utf-8") as f:
        numbers = json.load(f)
    assert numbers["quick"] is True
    check_figures(md, out)
    check_prose_once(name, md)
    return md, numbers


def check_prose_once(name, md):
    """The page is the script's markdown cells, each once and in order, with results between."""
    sys.path.insert(0, DOCS)
    import report
    with open(os.path.join(DOCS, f"{name}.py"), encoding="utf-8") as f:
        cells = [text.strip() for _, text in report.markdown_cells(f.read().splitlines())]
    assert len(cells) >= 3
    at = [md.find(cell) for cell in cells]
    assert all(md.count(cell) == 1 for cell in cells), "a markdown cell is missing from the page or repeated"
    assert at == sorted(at), "the page does not follow the notebook's order"


def check_figures(md, folder):
    """Every SVG the report links exists beside it, is well-formed, and draws something."""
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.svg)\)", md)
    assert figures, "the report links no figure"
    for fig in figures:
        root = ET.parse(os.path.join(folder, fig)).getroot()
        assert root.tag.endswith("svg"), fig
        drawn = [e for e in root if e.tag.split("}")[-1] in ("polyline", "rect", "circle")]
        assert len(drawn) >= 3, f"{fig} draws nothing"  # beyond the background and the frame


def test_01_autograd_tour(tmp_path):
    md, n = run_experiment("01_autograd_tour", tmp_path)
    assert "```mermaid" in md and "## 5. Every operation the model uses" in md
    assert md.index("```mermaid") > md.index("## 2. The graph")  # the graph sits in its section
    assert n["graph_ops"] >= 8
    assert n["tour_max_rel_error"] < 1e-6
    assert len(n["op_checks"]) >= 20
    assert all(err <= 1.0 for err in n["op_checks"].values()), n["op_checks"]
    assert any("window_attention" in k for k in n["op_checks"]) and any("rglru_scan" in k for k in n["op_checks"])
    assert n["model_check"] <= 1.0 and n["model_param_tensors"] > 30
    # the finite-difference sweep finds the textbook optimum eps ~ u^(1/3)
    assert 1e-7 <= n["best_eps_float64"] <= 1e-4
    assert n["best_eps_float32"] >= 1e-4


def test_02_rglru_anatomy(tmp_path):
    md, n = run_experiment("02_rglru_anatomy", tmp_path)
    for section in ("## 1. The spectrum of decay rates", "## 2. Memory horizons on text",
                    "## 3. An impulse through a layer", "## 4. State size against context length"):
        assert section in md
    # a = sqrt(U(0.81, 0.998)) and c = 8: horizons between 1.19 and 125 tokens with the gate open
    assert 1.18 <= n["init_tau_min"] < 2 and 60 < n["init_tau_max"] <= 125
    # an impulse never quite leaves a recurrent layer, and leaves an attention layer exactly at W
    for i in n["recurrent_layers"]:
        assert n["impulse_after_window"][str(i)] > 0
    for i in n["attention_layers"]:
        assert n["impulse_after_window"][str(i)] == 0
    # decoding state: constant in the context, as the formula says; a full KV cache is linear
    assert set(n["measured_state_bytes"]) == {n["formula_state_bytes"]}
    assert len(set(n["medium_state_bytes"])) == 1
    ctx, kv = n["medium_contexts"], n["medium_kv_cache_bytes"]
    assert all(b * ctx[0] == kv[0] * c for b, c in zip(kv, ctx))
    assert kv[0] == 2 * 16 * 4 * 64 * 4 * ctx[0]  # medium: 16 layers, 4 KV heads of 64, float32
    assert n["medium_state_bytes"][0] == (11 * 1024 + 5 * 2 * 4 * 512 * 64) * 4


def test_03_train_tiny(tmp_path):
    md, n = run_experiment("03_train_tiny", tmp_path)
    for section in ("## Pretraining", "## Fine-tuning", "### Stories after pretraining",
                    "### Chat replies before and after fine-tuning"):
        assert section in md
    assert abs(n["loss_before"] - n["ln_vocab"]) < 0.3  # an untrained model guesses uniformly
    assert n["pretrain_val_loss"] < n["loss_before"] - 0.3
    assert n["finetune_val_loss"] < n["chat_loss_before"]
    # the page says what the numbers say
    assert f"| {n['names_per_story']:.2f} ({2} stories) | {n['facts']} of 52 |" in md
    assert f"| {n['reply_rate_after']:.0%} of 3 |" in md


def test_04_recurrence_vs_attention(tmp_path):
    md, n = run_experiment("04_recurrence_vs_attention", tmp_path)
    runs = n["runs"]
    assert {k: r["layout"] for k, r in runs.items()} == {"1": "AAA", "2": "RAR", "3": "RRA", "0": "RRR"}
    for r in runs.values():
        assert math.isfinite(r["val"]) and r["val"] < math.log(512)  # learned something
        assert 1.0 < r["val"] / r["bpb"] / math.log(2) < 6     # bits/byte: a BPE token holds a few bytes
        assert r["init"] == "wyrd"
    assert len({c[-1][0] for c in n["curves"].values()}) == 1          # every run has the same budget
    assert {k: r["init"] for k, r in n["reference"].items()} == {"1": "reference", "3": "reference"}
    assert [a["layout"] for a in n["ablations"]] == ["RRA"] * 3
    assert "| attention_every_n |" in md
    assert n["best"] == int(min(runs, key=lambda k: runs[k]["val"]))  # the lowest held-out loss at equal tokens
    t = n["equal_time"]["seconds"]
    assert t == min(c[-1][2] for c in n["curves"].values())            # the fastest run's whole run
    for k, curve in n["curves"].items():                               # each read off its own curve at t
        assert min(v for _, v, _ in curve) <= n["equal_time"][k] <= max(v for _, v, _ in curve)


def test_05_speed(tmp_path):
    md, n = run_experiment("05_speed", tmp_path)
    assert n["matmul_gflops"] > 0 and n["scan_gbps"] > 0
    decode = n["decode"]
    contexts = sorted(decode, key=int)
    assert len({d["state_bytes"] for d in decode.values()}) == 1  # O(1) state
    # one step does not grow with the context; recomputing the context does
    assert n["decode_flatness"] < 3.0, decode
    assert decode[contexts[-1]]["full_forward_ms"] > 2 * decode[contexts[-1]]["step_ms"]
    assert all(0 < r["utilisation"] < 1 for r in n["training"].values())
    assert "## 4. Decoding cost against context length" in md


def test_06_recall(tmp_path):
    md, n = run_experiment("06_recall", tmp_path)
    for section in ("## 1. The task", "## 4. Recall against distance", "## 5. Recall against the number of pairs",
                    "## 7. Recall and decoding memory", "## 8. Against the expectation"):
        assert section in md
    assert n["layouts"] == {"0": "RRR", "1": "AAA", "3": "RRA"}
    params = n["params"].values()
    assert (max(params) - min(params)) / min(params) < 0.02               # three models of one size
    W, d = n["window"], n["d_model"]                                      # KV heads x head_dim = d
    assert n["state_bytes"] == {"0": 3 * d * 4, "1": 3 * 2 * W * d * 4, "3": (2 * d + 2 * W * d) * 4}
    chance, recall = n["chance"], n["memory"]
    # after its short training, all attention recalls what its window holds, well above chance (1/32) ...
    assert recall["1"]["inside"] > 3 * chance, recall
    # ... and nothing beyond what its three layers can reach
    assert recall["1"]["beyond"] < 0.15, recall


def test_figures_match_their_generator(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(DOCS, "make_figures.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in os.listdir(tmp_path):
        with open(tmp_path / name, encoding="utf-8") as f, \
                open(os.path.join(DOCS, "figures", name), encoding="utf-8") as g:
            assert f.read() == g.read(), f"docs/figures/{name} is stale: run python docs/make_figures.py"


# -- architecture.md cites only what exists -------------------------------------

def defined_names(path):
    """Dotted names defined in a Python file: functions, classes, methods, module and class attributes."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        names.add(prefix + t.id)
    visit(tree.body, "")
    return names


def python_files():
    files = [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")]
    return files + [os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".py")]


def test_architecture_cites_only_real_code():
    with open(os.path.join(DOCS, "architecture.md"), encoding="utf-8") as f:
        text = f.read()
    cited = re.findall(r"([\w/]+\.py):([A-Za-z_][\w.]*[\w])", text)
    assert len(cited) >= 40, "expected the walkthrough to cite the code as file.py:name"
    missing = []
    for file, name in cited:
        path = next((p for p in (os.path.join(ROOT, file), os.path.join(DOCS, file)) if os.path.exists(p)), None)
        if path is None or name not in defined_names(path):
            missing.append(f"{file}:{name}")
    # `name()` style references: the last part must be defined somewhere in the project
    everywhere = {n.split(".")[-1] for p in python_files() for n in defined_names(p)}
    missing += [f"{call}()" for call in re.findall(r"`([A-Za-z_][\w.]*)\(\)`", text)
                if call.split(".")[-1] not in everywhere]
    assert not missing, f"architecture.md cites names that do not exist: {missing}"


@pytest.mark.parametrize("doc", ["architecture.md"])
def test_doc_links_resolve(doc):
    with open(os.path.join(DOCS, doc), encoding="utf-8") as f:
        text = f.read()
    links = [l for l in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in l]
    assert links
    broken = [l for l in links if not os.path.exists(os.path.join(DOCS, l))]
    assert not broken, f"{doc} links to missing files: {broken}"


EXPERIMENTS = ["01_autograd_tour", "02_rglru_anatomy", "03_train_tiny", "04_recurrence_vs_attention", "05_speed",
               "06_recall"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_a_percent_notebook_with_committed_results(name):
    """Opens as a notebook (jupytext percent format), and its full-run results are committed."""
    with open(os.path.join(DOCS, f"{name}.py"), encoding="utf-8") as f:
        source = f.read()
    assert source.startswith("# %% [markdown]")
    assert source.count("# %% [markdown]") >= 3 and source.count("\n# %%\n") >= 3
    results = os.path.join(DOCS, "results")
    with open(os.path.join(results, f"{name}.json"), encoding="utf-8") as f:
        assert json.load(f)["quick"] is False, f"docs/results/{name} comes from a --quick run"
    with open(os.path.join(results, f"{name}.md"), encoding="utf-8") as f:
        check_figures(f.read(), results)


def test_report_shows_results_inline_under_ipython(tmp_path, monkeypatch):
    """Under IPython every table and figure is displayed as it is made (and still written)."""
    import types
    sys.path.insert(0, DOCS)
    import report
    shown = []
    display = types.SimpleNamespace(display=shown.append, Markdown=lambda s: ("md", s), SVG=lambda s: ("svg", s))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: object()))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    rep = report.Report(types.SimpleNamespace(out=str(tmp_path), quick=True), "01_autograd_tour")
    rep.table(["a"], [[1.5]])
    rep.figure("x.svg", "<svg/>", "a figure")
    assert shown == [("md", "| a |\n|---|\n| 1.5 |\n"), ("svg", "<svg/>")]
    assert (tmp_path / "x.svg").read_text() == "<svg/>"
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))  # plain Python
    rep.md("text")
    assert len(shown) == 2
