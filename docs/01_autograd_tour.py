# %% [markdown]
# # Autograd tour
#
# Wyrd trains with a hand-written reverse-mode autograd (`autograd.py`). A
# `Tensor` wraps a NumPy array; every operation computes its result and, right
# beside it, a small `backward(g)` closure that receives dL/d(result) and adds
# dL/d(input) into each input's `.grad`. `Tensor.backward()` sorts the graph
# topologically and calls those closures once, in reverse.
#
# In this notebook we build a small expression, look at the graph it records,
# and check every gradient against finite differences: first by hand, then for
# every operation the model uses, then for a whole (nano) Wyrd model.
#
# Run it as a script (`python docs/01_autograd_tour.py [--quick] [--out DIR]`)
# or open it as a notebook (Jupyter with jupytext, or VS Code).

# %%
import report  # first: puts the repo root on sys.path

from dataclasses import replace

import numpy as np

import autograd
import svg
import rglru_reference
import wyrd
from autograd import Tensor, gradcheck, no_grad

args = report.parse_args("Autograd tour: a small graph, and every gradient checked numerically.")
rep = report.Report(args, "01_autograd_tour")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A small expression
#
# Logistic regression on four points: `p = sigmoid(x @ w + b)` and the binary
# cross-entropy `-mean(y log p + (1 - y) log(1 - p))`. It is small enough to
# print, and it exercises a matmul, a broadcast (`b` is added to every row), an
# elementwise nonlinearity, a log and a mean. We use float64 throughout, so the
# finite differences below are accurate to ~1e-10.

# %%
x = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
w = Tensor(rng.standard_normal((3, 1)), requires_grad=True)
b = Tensor(np.zeros(1), requires_grad=True)
y = Tensor(np.array([[1.0], [0.0], [1.0], [0.0]]))  # labels: a constant, no gradient


def bce(x, w, b):
    p = (x @ w + b).sigmoid()                                   # [4, 1]
    return -(y * p.log() + (1.0 - y) * (1.0 - p).log()).mean()  # scalar


loss = bce(x, w, b)
print("loss", loss.item())

# %% [markdown]
# ## 2. The graph
#
# Each result keeps its inputs in `_parents` and its `backward` closure in
# `_backward`. The closure's qualified name tells which operation made it
# (`Tensor.__add__.<locals>.backward` is `+`). Walking `_parents` from the loss
# gives the whole graph. (After `backward()` the graph is released to save
# memory, so we look at it first.) Subtraction from a constant and negation
# appear as `-` and `*` with a constant, because `1 - p` is `Tensor.__rsub__`
# and `-t` is `t * -1`.

# %%
OPS = {"__add__": "+", "__sub__": "-", "__mul__": "*", "__truediv__": "/", "__pow__": "**",
       "__matmul__": "@", "__getitem__": "[ ]"}


def op_name(t):
    if t._backward is None:
        return None
    name = t._backward.__qualname__.split(".<locals>")[0].split(".")[-1]
    return OPS.get(name, name)


def graph(out, names):
    """Nodes of the graph in topological order (inputs first): (id, label, parent ids)."""
    order, seen = [], set()

    def visit(t):
        if id(t) in seen:
            return
        seen.add(id(t))
        for p in t._parents:
            visit(p)
        label = op_name(t) or names.get(id(t), "const")
        order.append((id(t), f"{label}  {list(t.shape)}", [id(p) for p in t._parents]))
    visit(out)
    return order


names = {id(x): "x", id(w): "w", id(b): "b", id(y): "y"}
nodes = graph(loss, names)
index = {nid: i for i, (nid, _, _) in enumerate(nodes)}
for i, (nid, label, parents) in enumerate(nodes):
    print(f"n{i:<2d} {label:18s} <- {', '.join(f'n{index[p]}' for p in parents) or 'leaf'}")

mermaid = ["flowchart LR"]
for i, (nid, label, parents) in enumerate(nodes):
    mermaid.append(f'  n{i}["{label}"]')
    mermaid += [f"  n{index[p]} --> n{i}" for p in parents]

rep.md("```mermaid\n" + "\n".join(mermaid) + "\n```")
rep.record(graph_nodes=len(nodes), graph_ops=sum(1 for n in nodes if n[2]))

# %% [markdown]
# ## 3. Backward, and the same gradients by finite differences
#
# `loss.backward()` fills `x.grad`, `w.grad`, `b.grad`. The central difference
# `(L(θ + ε) - L(θ - ε)) / 2ε` approximates the same derivative with an error of
# order ε² (the Taylor terms of odd order cancel). We perturb every entry of
# every input, one at a time.

# %%
loss.backward()
analytic = {"x": x.grad.copy(), "w": w.grad.copy(), "b": b.grad.copy()}


def numeric_grad(f, inputs, t, eps=1e-6):
    g = np.zeros_like(t.data)
    flat, gflat = t.data.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        with no_grad():
            flat[i] = old + eps
            up = f(*inputs).item()
            flat[i] = old - eps
            down = f(*inputs).item()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


rows, worst = [], 0.0
for name, t in (("x", x), ("w", w), ("b", b)):
    num = numeric_grad(bce, (x, w, b), t)
    err = np.abs(analytic[name] - num)
    rel = float(np.max(err / np.maximum(np.abs(num), 1e-12)))
    worst = max(worst, rel)
    rows.append([name, str(list(t.shape)), f"{analytic[name].reshape(-1)[0]:+.10f}", f"{num.reshape(-1)[0]:+.10f}",
                 float(err.max()), rel])
    print(f"{name}: max |analytic - numeric| {err.max():.2e}, max relative {rel:.2e}")

rep.table(["input", "shape", "analytic (first entry)", "numeric (first entry)", "max abs error", "max rel error"], rows)
rep.record(tour_max_rel_error=worst)

# %% [markdown]
# ## 4. Why ε = 1e-6?
#
# The central difference has a truncation error ~ε² f'''/6, which shrinks with
# ε, and a rounding error ~u·|L|/ε (u is the unit roundoff, 1.1e-16 in float64,
# 6e-8 in float32), which grows as ε shrinks. The total is smallest near
# ε ≈ u^(1/3): about 5e-6 in float64, 4e-3 in float32. That is why gradient
# checks run in float64, and why `autograd.gradcheck` refuses float32 inputs.

# %%
epsilons = np.logspace(-1, -12, 23)
sweep = {}
for dtype in (np.float64, np.float32):
    xs, ws, bs = (Tensor(t.data.astype(dtype)) for t in (x, w, b))
    y.data = y.data.astype(dtype)
    errs = []
    for eps in epsilons:
        flat = ws.data.reshape(-1)
        old = flat[0]
        flat[0] = old + dtype(eps)
        up = bce(xs, ws, bs).item()
        flat[0] = old - dtype(eps)
        down = bce(xs, ws, bs).item()
        flat[0] = old
        step = (float(old + dtype(eps)) - float(old - dtype(eps)))  # the step actually taken after rounding
        num = (up - down) / step if step else 0.0
        errs.append(abs(num - analytic["w"].reshape(-1)[0]))
    sweep[np.dtype(dtype).name] = errs
y.data = y.data.astype(np.float64)
best = {k: float(epsilons[int(np.argmin(v))]) for k, v in sweep.items()}
print("best epsilon:", best)

rep.figure("01_fd_error.svg", svg.line_plot(
    None, [{"label": k, "x": list(epsilons), "y": [e if e > 0 else None for e in v], "marker": True}
           for k, v in sweep.items()],
    title="Central-difference error vs step size", xlabel="ε", ylabel="|numeric - analytic|",
    logx=True, logy=True, legend="bottom right"), "finite-difference error against epsilon")
rep.table(["dtype", "best ε", "error at best ε", "error at ε = 1e-6"],
          [[k, best[k], float(min(v)), float(v[int(np.argmin(np.abs(np.log10(epsilons) + 6)))])]
           for k, v in sweep.items()])
rep.record(best_eps_float64=best["float64"], best_eps_float32=best["float32"])

# %% [markdown]
# ## 5. Every operation the model uses
#
# `autograd.gradcheck(f, inputs)` does the same for any function: it checks
# `sum(f(inputs) * G)` for a random, mixed-sign `G` (an all-ones `G` would hide
# errors that cancel across a row, which normalisation backwards can do), and
# returns the worst error as a fraction of the tolerance
# (`|analytic - numeric| <= 1e-7 + 1e-5 |numeric|`), so anything ≤ 1 passes.
#
# The list covers the primitive ops, the fused ops (each with its own
# hand-written backward), and the Numba kernels of `wyrd.py`: RoPE, the RG-LRU
# scan and the sliding-window attention (with a window shorter than the
# sequence and grouped KV heads, so the masking and the head sharing are tested).

# %%
def T(*shape, positive=False):
    a = rng.standard_normal(shape)
    return Tensor(np.abs(a) + 0.5 if positive else a)


Bq, Tq, H, KV, D = 2, 7, 4, 2, 4
cos, sin = wyrd.rope_angles(np.arange(Tq), D, 10000.0, np.float64)
mixer = rng.standard_normal((4, 3))  # fixed weights so reshape's output is not a plain permutation
checks = [
    ("a + b (broadcast)", lambda a, b: a + b, [T(3, 4), T(4)]),
    ("a - b (broadcast)", lambda a, b: a - b, [T(3, 4), T(3, 1)]),
    ("a * b (broadcast)", lambda a, b: a * b, [T(2, 3, 4), T(3, 1)]),
    ("a / b", lambda a, b: a / b, [T(3, 4), T(3, 4, positive=True)]),
    ("a ** 3", lambda a: a ** 3, [T(3, 4)]),
    ("a ** 0.5", lambda a: a ** 0.5, [T(3, 4, positive=True)]),
    ("a @ b (batched)", lambda a, b: a @ b, [T(2, 3, 4), T(4, 5)]),
    ("sum(axis=1)", lambda a: a.sum(axis=1), [T(3, 4, 2)]),
    ("mean()", lambda a: a.mean(), [T(3, 4)]),
    ("reshape", lambda a: a.reshape(4, 3) * mixer, [T(3, 4)]),
    ("transpose", lambda a: a.transpose(1, 0, 2), [T(2, 3, 4)]),
    ("a[idx] (repeated)", lambda a: a[np.array([0, 2, 0])], [T(3, 4)]),
    ("exp", lambda a: a.exp(), [T(3, 4)]),
    ("log", lambda a: a.log(), [T(3, 4, positive=True)]),
    ("sqrt", lambda a: a.sqrt(), [T(3, 4, positive=True)]),
    ("sigmoid", lambda a: a.sigmoid(), [T(3, 4)]),
    ("silu", lambda a: a.silu(), [T(3, 4)]),
    ("cat / split", lambda a, b: autograd.cat(autograd.split(autograd.cat([a, b]), [2, 3, 2])[::-1]),
     [T(3, 4), T(3, 3)]),
    ("embedding", lambda e: autograd.embedding(e, np.array([[1, 3, 1], [0, 2, 3]])), [T(5, 4)]),
    ("linear", lambda a, wt, bias: autograd.linear(a, wt, bias), [T(2, 3, 4), T(5, 4), T(5)]),
    ("rmsnorm", lambda a, wt: autograd.rmsnorm(a, wt, 1e-6), [T(2, 3, 8), T(8)]),
    ("swiglu", lambda h: autograd.swiglu(h), [T(3, 12)]),
    ("cross_entropy (masked)", lambda z: autograd.cross_entropy(z, np.array([1, 0, 4, 2]),
                                                               np.array([1, 1, 0, 1])), [T(4, 5)]),
    ("rope (kernel)", lambda q: wyrd.rope(q, cos, sin), [T(Bq, Tq, H, D)]),
    ("rglru_scan (kernel)", lambda a, u, h0: rglru_reference.rglru_scan(a.sigmoid(), u, h0),
     [T(Bq, Tq, 6), T(Bq, Tq, 6), T(1, 1, 6)]),
    ("window_attention (kernel, W=3, GQA)", lambda q, k, v: wyrd.window_attention(q, k, v, 3),
     [T(Bq, Tq, H, D), T(Bq, Tq, KV, D), T(Bq, Tq, KV, D)]),
]
op_rows = []
for name, f, inputs in checks:
    err = gradcheck(f, inputs)
    op_rows.append([name, " ".join(str(list(t.shape)) for t in inputs), err])
    print(f"{name:38s} worst error / tolerance {err:.2e}")

rep.table(["op", "input shapes", "worst error / tolerance"], op_rows)
rep.record(op_checks={name: err for name, _, err in op_rows})

# %% [markdown]
# ## 6. A whole model
#
# Finally the whole `nano` Wyrd in float64, with a window of 4 so attention
# really slides, on a batch of random tokens: every parameter tensor (sampled
# entries of each, to keep it quick), from `embed_tokens` through the
# recurrent and attention layers to the tied head.

# %%
cfg = replace(wyrd.get_config("nano"), sliding_window=4, vocab_size=64)
model = wyrd.Chimera(cfg, seed=0, dtype=np.float64)
for p in model.parameters():  # move off the init (h0 = 0, norms = 1) so every path carries gradient
    p.data += 0.05 * rng.standard_normal(p.shape)
ids = rng.integers(0, cfg.vocab_size, (2, 10))
params = model.named_parameters()
samples = 2 if args.quick else 20
model_err = gradcheck(lambda *ps: model.loss(ids[:, :-1], ids[:, 1:]), [p for _, p in params], samples=samples)
print(f"whole nano model: {len(params)} parameter tensors, worst error / tolerance {model_err:.2e}")

rep.md(f"""
The `nano` preset in float64 (window 4, vocabulary 64, {model.num_params():,} parameters in
{len(params)} tensors: {sum(not cfg.is_attention(i) for i in range(cfg.n_layers))} recurrent and
{sum(cfg.is_attention(i) for i in range(cfg.n_layers))} attention layer), loss over 2 sequences of 9
tokens, {samples} sampled entries of every parameter tensor: worst error / tolerance
**{model_err:.2e}**.
""")
rep.record(model_check=model_err, model_param_tensors=len(params))
rep.save()
