# %% [markdown]
# # RG-LRU anatomy
#
# The recurrent layers of Wyrd are RG-LRUs (Griffin's Real-Gated Linear
# Recurrent Unit). Per channel, the state follows
#
#     a_t = a ** (c * r_t)                      a = sigmoid(lambda_param), c = 8
#     h_t = a_t * h_{t-1} + sqrt(1 - a_t**2) * (i_t * xp_t)
#
# so each channel forgets at its own rate: an input seen `k` steps ago still
# weighs `a_{t-k+1} ... a_t` in `h_t`. A channel with constant `a_t = α` forgets
# with a time constant (its *memory horizon*) of `τ = -1 / ln α` tokens: after τ
# tokens an input has faded to 1/e.
#
# This notebook trains a small Wyrd for a few minutes and looks inside:
#
# 1. the spectrum of decay rates, at initialisation and after training;
# 2. the memory horizon each channel actually uses on text (the gate `r_t`
#    stretches the horizon: `τ = 1 / (c r_t |ln a|)`);
# 3. how an impulse at position 0 decays through a recurrent layer, and how it
#    is cut off sharply through an attention layer (a window of `W` keys);
# 4. what that buys at inference: the bytes of state a decoder keeps, constant
#    in the context length, against a transformer's growing KV cache.

# %%
import report  # first: puts the repo root on sys.path

import os
import tempfile
from dataclasses import replace

import numpy as np

import svg
import data
import train
import wyrd
from autograd import Tensor, embedding, no_grad

args = report.parse_args("RG-LRU anatomy: decay spectrum, memory horizons, impulse response, state size.")
rep = report.Report(args, "02_rglru_anatomy")

# Full: the tiny preset (d=256, 6 layers: 4 recurrent, 2 attention) for a few minutes of CPU.
PRESET = "nano" if args.quick else "tiny"
STORIES = "builtin:400" if args.quick else "builtin:6000"
CFG = replace(train.PRETRAIN, steps=12 if args.quick else 240, batch_size=8,
              seq_len=64 if args.quick else 256, warmup=3 if args.quick else 20,
              eval_every=0, ckpt_every=10 ** 9, log_every=5 if args.quick else 25)
IMPULSE_T = 64 if args.quick else 1024   # positions followed after the impulse

# %% [markdown]
# ## Train a model
#
# `train.pretrain` trains a tokenizer on the built-in stories, then the model.
# We keep the freshly initialised twin (same config, same seed) to compare with.

# %%
work = tempfile.mkdtemp(prefix="wyrd-anatomy-")
model, tok, result = train.pretrain([STORIES], os.path.join(work, "anatomy.safetensors"), PRESET, cfg=CFG)
init = wyrd.Chimera(model.config, seed=CFG.seed)  # what training started from
cfg = model.config
c = cfg.c
recurrent = [i for i in range(cfg.n_layers) if not cfg.is_attention(i)]
attention = [i for i in range(cfg.n_layers) if cfg.is_attention(i)]
print(f"{PRESET}: layers {recurrent} recurrent, {attention} attention; held-out loss {result['val_loss']:.3f}")
rep.md(f"""
A `{PRESET}` Wyrd (d_model {cfg.d_model}, layers {recurrent} recurrent and {attention} attention,
window {cfg.sliding_window}, {model.num_params():,} parameters) pretrained with `train.pretrain` on
the built-in stories for {CFG.steps} steps of {CFG.batch_size} x {CFG.seq_len} tokens: held-out loss
{result['val_loss']:.3f} (train {result['train_loss']:.3f}). Its untrained twin (same seed) is
the "init" below.
""")

# %% [markdown]
# ## 1. The spectrum of decay rates
#
# Wyrd initialises `lambda_param` so that `a = sigmoid(lambda)` is Griffin's
# `sqrt(U(0.81, 0.998))`, in [0.9, 0.999]. With the gate fully open (`r_t = 1`) a
# channel's horizon is `τ = 1 / (c |ln a|)`: from 1.2 tokens (a = 0.9) to 125 tokens
# (a = 0.999); uniform in a² puts most channels at the short end. A histogram over
# log-spaced horizons shows where training moved them.


# %%
def base_horizon(layer):
    """Horizon in tokens of each channel with the gate open (r_t = 1): 1 / (c |ln a|)."""
    log_a = wyrd.rglru_log_a(layer.temporal_mix.lambda_param.data)[0]
    return 1.0 / (c * -log_a)


bins = np.logspace(0, 4, 21)  # 1 to 10,000 tokens, 5 bins per decade
centres = np.sqrt(bins[:-1] * bins[1:])


def histogram(values):
    counts, _ = np.histogram(values, bins)
    return list(counts / len(values))


rows, taus = [], {"init": [], "trained": []}
for i in recurrent:
    lam0 = init.layers[i].temporal_mix.lambda_param.data
    lam1 = model.layers[i].temporal_mix.lambda_param.data
    tau0, tau1 = base_horizon(init.layers[i]), base_horizon(model.layers[i])
    taus["init"].append(tau0)
    taus["trained"].append(tau1)
    rows.append([f"layer {i}", float(np.median(tau0)), float(np.median(tau1)), float(np.abs(lam1 - lam0).mean()),
                 float(np.median(tau1 / tau0))])
    print(f"layer {i}: median base horizon {np.median(tau0):.1f} -> {np.median(tau1):.1f}, "
          f"mean |change of lambda| {np.abs(lam1 - lam0).mean():.4f}")
init_tau, trained_tau = np.concatenate(taus["init"]), np.concatenate(taus["trained"])
series = [{"label": "init", "x": list(centres), "y": histogram(init_tau), "color": "#888", "dash": "6 4",
           "marker": True},
          {"label": f"after {CFG.steps} steps", "x": list(centres), "y": histogram(trained_tau), "marker": True}]

rep.md(f"Share of channels per horizon bin, all {len(recurrent)} recurrent layers pooled:")
rep.figure("02_decay_spectrum.svg", svg.line_plot(
    None, series, title="Decay spectrum: horizon with the gate open, 1 / (c |ln a|)",
    xlabel="horizon τ (tokens, log scale)", ylabel="share of channels", logx=True, legend="top right"),
    "histogram of channel horizons at init and after training")
rep.table(["", "median τ at init", "median τ trained", "mean abs change of lambda_param",
           "median τ trained / τ init"], rows)
ratios = [row[4] for row in rows]
moved = "hardly moves" if all(0.8 < r < 1.25 for r in ratios) else "moves"
budget = sum(train.lr_at(step, CFG) for step in range(CFG.steps))  # Adam: |step| <~ lr, whatever the gradient
rep.md(f"""
The spectrum {moved} in a run this short: per layer, the median horizon changed by
a factor of {min(ratios):.2f} to {max(ratios):.2f} (per channel, trained over init). AdamW moves a parameter by at most
about the learning rate per step, whatever its gradient, so in {CFG.steps} steps a
`lambda_param` can move by at most the summed learning rate, {budget:.2f}; and since
`τ ≈ e^λ / c` for large λ, a horizon can change by a factor of at most about
e^{budget:.2f} = {np.exp(budget):.2f}. (The gradient of a slow channel is small besides:
`d a_t / d lambda ≈ a_t c r_t (1 - a)`, architecture.md 3.1.) What adapts quickly is
the gate `r_t`, which sets the horizon token by token (next section).
""")
rep.record(init_tau_min=float(init_tau.min()), init_tau_max=float(init_tau.max()),
           trained_tau_median={str(i): float(np.median(t)) for i, t in zip(recurrent, taus["trained"])},
           mean_abs_lambda_change={str(i): row[3] for i, row in zip(recurrent, rows)})

# %% [markdown]
# ## 2. Memory horizons on text
#
# The gate `r_t = sigmoid(recurrence_gate_proj(x_t))` scales the exponent, so the
# decay actually applied at step t is `a_t = exp(c r_t ln a)`. On held-out text
# we average `-ln a_t` over positions per channel; its inverse is the channel's
# effective horizon. Channels with a horizon beyond the attention window carry
# information that the attention layers can no longer see.
#
# To read the layers' inputs we run the blocks one by one (`Block.__call__`)
# and keep `norm1(x)`, the input of each temporal-mix layer. We do it in float64
# (a copy of the weights), so that the impulse responses below are accurate far
# below float32's 1e-7.


# %%
def in_float64(m):
    m64 = wyrd.Chimera(m.config, dtype=np.float64)
    m64.load_state_dict(m.state_dict())
    return m64


def mix_inputs(m, ids):
    """Input of every layer's temporal mix, norm1(x) [B, T, d], for token ids [B, T]."""
    out = []
    with no_grad():
        x = embedding(m.embed_tokens.weight, ids)
        for layer in m.layers:
            out.append(layer.norm1(x))
            x = layer(x)
    return out


def gates(layer, xin):
    """r_t and -ln a_t [B, T, d] of a recurrent layer on its input."""
    mix = layer.temporal_mix
    with no_grad():
        r = mix.recurrence_gate_proj(xin).sigmoid().data
    log_a = wyrd.rglru_log_a(mix.lambda_param.data)[0].astype(r.dtype)
    return r, -c * r * log_a


_, val_tokens, _ = data.load_tokens([STORIES], tok, work)
text = np.asarray(val_tokens[:IMPULSE_T + 1, 0], dtype=np.int64)[None, :IMPULSE_T]  # [1, T] held-out
trained64, init64 = in_float64(model), in_float64(init)
inputs = {"init": mix_inputs(init64, text), "trained": mix_inputs(trained64, text)}

series, rows, eff = [], [], {}
for name, m in (("init", init64), ("trained", trained64)):
    for i in recurrent:
        r, rate = gates(m.layers[i], inputs[name][i])
        tau = np.sort(1.0 / rate.mean(axis=(0, 1)))                       # [d], effective horizon per channel
        eff[f"{name} {i}"] = tau
        rows.append([f"{name} layer {i}", float(r.mean()), float(np.median(tau)),
                     float((tau > cfg.sliding_window).mean()), float((tau > CFG.seq_len).mean())])
        if name == "trained" or i == recurrent[0]:
            series.append({"label": f"{name} layer {i}", "x": list(np.linspace(0, 100, len(tau))), "y": list(tau),
                           **({"color": "#888", "dash": "6 4"} if name == "init" else {})})
for name, row in zip(eff, rows):
    print(f"{name}: mean r {row[1]:.2f}, median effective horizon {row[2]:.1f} tokens")

rep.md(f"""
Each channel's effective horizon on {IMPULSE_T} held-out positions of the trained model and of
its init (channels sorted, shortest first; a half-open gate doubles the horizon). Dashed lines:
the attention window W = {cfg.sliding_window} and the training length {CFG.seq_len}.
""")
rep.figure("02_memory_horizon.svg", svg.line_plot(
    None, series, title="Effective memory horizon per channel on held-out text",
    xlabel="channel percentile (sorted by horizon)", ylabel="horizon (tokens, log scale)", logy=True,
    legend="top left", hlines=[(cfg.sliding_window, f"window W = {cfg.sliding_window}"),
                               (CFG.seq_len, f"training length {CFG.seq_len}")]),
    "effective horizon per channel")
rep.table(["layer", "mean r_t", "median horizon", f"share > W = {cfg.sliding_window}",
           f"share > {CFG.seq_len}"], [row[:3] + [f"{row[3]:.0%}", f"{row[4]:.0%}"] for row in rows])
rep.record(effective_horizon_median={k: float(np.median(v)) for k, v in eff.items()})

# %% [markdown]
# ## 3. An impulse through a layer
#
# Perturb the input of a layer at position 0 only, and follow the change of the
# layer's output at every later position. In a recurrent layer the gates at
# step t depend on x_t alone, so the perturbation enters the state once, at
# t = 0, and then `Δh_t = a_t Δh_{t-1}`: it decays geometrically, channel by
# channel, and never reaches exactly zero. In an attention layer, position t
# reads keys t - W + 1 .. t, so the change is exactly zero from t = W on.


# %%
def impulse(layer, xin, rng):
    """|Δ output_t| / |Δ output_0| of layer.temporal_mix after perturbing its input at t = 0."""
    bump = xin.data.copy()
    bump[:, 0] += rng.standard_normal(bump.shape[-1])   # an input of the usual scale (x is RMS-normed)
    with no_grad():
        y0 = layer.temporal_mix(xin).data
        y1 = layer.temporal_mix(Tensor(bump)).data
    d = np.sqrt(((y1 - y0) ** 2).sum(axis=-1))[0]       # [T]
    return d / d[0]


rng = np.random.default_rng(0)
positions = np.arange(IMPULSE_T)
series, resp = [], {}
for i in recurrent + attention:
    kind = "attention" if cfg.is_attention(i) else "recurrent"
    resp[i] = impulse(trained64.layers[i], inputs["trained"][i], rng)
    series.append({"label": f"layer {i} ({kind})", "x": list(positions), "y": list(resp[i]),
                   **({"dash": "4 2", "width": 1} if kind == "attention" else {})})
    after = resp[i][cfg.sliding_window:]
    print(f"layer {i} {kind}: response at t=W {resp[i][min(cfg.sliding_window, IMPULSE_T - 1)]:.2e}, "
          f"max after the window {after.max() if len(after) else float('nan'):.2e}")

rep.md(f"""
The curves show `|Δy_t| / |Δy_0|` for each layer of the trained model (float64 copy). The
slowest channels dominate the recurrent tails. Attention layers (dashed) are exactly zero from
t = W = {cfg.sliding_window} on, where position 0 leaves the window (the line stops: zero is off a
log axis); inside the window their response swings with how much each query happens to attend
to position 0.
""")
rep.figure("02_impulse.svg", svg.line_plot(
    None, series, title="Impulse at position 0: relative change of each layer's output",
    xlabel="position t", ylabel="|Δy_t| / |Δy_0| (log scale)", logy=True,
    legend="bottom right", ylim=(1e-7, 2), vlines=[(cfg.sliding_window, f"t = W = {cfg.sliding_window}")]),
    "impulse response of each layer")
at = [p for p in (1, 10, 100, cfg.sliding_window - 1, cfg.sliding_window, IMPULSE_T - 1) if p < IMPULSE_T]
rep.table(["layer"] + [f"t = {p}" for p in at],
          [[f"{i} ({'attention' if cfg.is_attention(i) else 'recurrent'})"] + [float(resp[i][p]) for p in at]
           for i in recurrent + attention])
rep.record(impulse_after_window={str(i): float(resp[i][cfg.sliding_window:].max())
                                 for i in recurrent + attention if IMPULSE_T > cfg.sliding_window},
           window=cfg.sliding_window, recurrent_layers=recurrent, attention_layers=attention)

# %% [markdown]
# ## 4. State size against context length
#
# To generate the next token, Wyrd keeps per recurrent layer only `h` [B, d], and
# per attention layer a ring buffer of the last W rotated keys and values
# [B, KV, W, D] (`wyrd.DecodeState`). Neither grows with the context. A
# transformer with full attention in every layer must keep every past key and
# value: 2 x layers x KV x D numbers per token.
#
# We measure the state of our trained model after consuming contexts of growing
# length, check it against the formula, and draw the formula for the 230M
# `medium` preset (Wyrd's size) against a full KV cache of the same shape.


# %%
def state_bytes(cfg, itemsize=4):
    """Bytes of decoding state of one sequence: h per recurrent layer, K and V rings per attention layer."""
    n_attn = sum(cfg.is_attention(i) for i in range(cfg.n_layers))
    return ((cfg.n_layers - n_attn) * cfg.d_model + n_attn * 2 * cfg.n_kv_heads * cfg.sliding_window * cfg.head_dim) \
        * itemsize


def kv_cache_bytes(cfg, context, itemsize=4):
    """Bytes of a full KV cache: every layer attends to every past token."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * itemsize


measured_at = [16, 64, 256] if args.quick else [16, 128, 512, 2048]
state = model.init_state(1)
measured = []
for n in measured_at:
    model.step(np.full((1, n - state.pos), tok.eot_id), state)   # consume tokens up to context n
    measured.append(state.nbytes())
print("measured state bytes", dict(zip(measured_at, measured)), "formula", state_bytes(cfg))

medium = wyrd.get_config("medium")
contexts = [2 ** k for k in range(6, 18)]   # 64 .. 131,072 tokens
wyrd_b = [state_bytes(medium)] * len(contexts)
kv_b = [kv_cache_bytes(medium, n) for n in contexts]
ring_b = [kv_cache_bytes(medium, min(n, medium.sliding_window)) for n in contexts]
rep.md("Measured on the model above (`DecodeState.nbytes()` after stepping to each context):")
rep.table(["context"] + [str(n) for n in measured_at],
          [["measured state bytes"] + measured, ["formula"] + [state_bytes(cfg)] * len(measured_at)])
rep.md(f"""
For the `medium` preset (Wyrd, d = {medium.d_model}, {medium.n_layers} layers of which
{sum(medium.is_attention(i) for i in range(medium.n_layers))} attention, KV = {medium.n_kv_heads},
D = {medium.head_dim}, W = {medium.sliding_window}), float32, one sequence:
""")
rep.figure("02_state_bytes.svg", svg.line_plot(
    None, [{"label": "full KV cache, all 16 layers", "x": contexts, "y": kv_b},
           {"label": "sliding-window KV, all 16 layers", "x": contexts, "y": ring_b, "dash": "6 4"},
           {"label": "Wyrd: 11 x h + 5 x ring of W", "x": contexts, "y": wyrd_b, "width": 3}],
    title="Decoding state of the 230M medium preset", xlabel="context length (tokens)",
    ylabel="bytes per sequence (float32)", logx=True, logy=True, yfmt=svg.fmt_bytes, legend="top left"),
    "state bytes against context length")
show = [n for n in contexts if n in (1024, 8192, 32768, 131072)]
rep.table(["context", "Wyrd state", "full KV cache", "ratio"],
          [[f"{n:,}", svg.fmt_bytes(state_bytes(medium)), svg.fmt_bytes(kv_cache_bytes(medium, n)),
            f"{kv_cache_bytes(medium, n) / state_bytes(medium):.0f}x"] for n in show])
rep.record(measured_contexts=measured_at, measured_state_bytes=measured, formula_state_bytes=state_bytes(cfg),
           medium_contexts=contexts, medium_state_bytes=wyrd_b, medium_kv_cache_bytes=kv_b)
rep.save()
