# %% [markdown]
# # What each layer kind can remember: associative recall
#
# An attention layer recalls exactly, but only what lies in its window: a query
# at position `t` reads the keys `t - W + 1 .. t` and nothing older. A recurrent
# layer (the RG-LRU) carries everything it has seen into every later step, but in
# a state of fixed size (`d` numbers), so it must compress. *Multi-query
# associative recall* (MQAR) puts the two to a test that has one right answer:
# a sequence lists key -> value pairs, then asks for the values of some of the
# keys. The model must output each key's value.
#
# We train three models of the same size on MQAR, with the project's own
# training step, and measure their recall
#
# 1. against the distance between a pair and the query that asks for it, below
#    and above the attention window W;
# 2. against the number of pairs N, at a fixed distance beyond W (what the
#    recurrent state can hold);
#
# and set each model's recall beside the bytes of state it keeps to decode.
#
# ```bash
# python docs/06_recall.py           # the full run (this page)
# python docs/06_recall.py --quick   # a smoke run in under a minute (what the tests run):
#                                    # d_model 32, W = 8, 180 steps of 16 x 32 positions
# ```

# %%
import report  # first: puts the repo root on sys.path

import time
from dataclasses import replace

import numpy as np

import svg
import train
import wyrd
from autograd import no_grad

args = report.parse_args("Associative recall (MQAR) of all-recurrent, all-attention and hybrid Chimera models.")
rep = report.Report(args, "06_recall")
quick = args.quick

# %% [markdown]
# ## 1. The task
#
# The vocabulary has three disjoint sets of tokens: 32 keys (`k0`..`k31`), 32
# values (`v0`..`v31`) and 16 filler tokens (`.`). A sequence holds N key-value
# pairs (N distinct keys, each value drawn uniformly), then a stretch of filler,
# then queries: each of the N keys again, in random order, each followed by its
# value. The filler between pairs and queries is empty in a third of the
# sequences, up to W = 16 tokens long in a third, and up to all the room there
# is in the rest; random filler pads the front, so every sequence has the same
# length. The model reads the sequence left to right, as in language
# modelling; loss and accuracy are taken on the answers only, the positions where
# the input is a queried key and the target is its value (the `mask` of
# `model.loss(ids, targets, mask)`, the path fine-tuning uses for assistant
# tokens). Accuracy is the greedy prediction (argmax over the whole vocabulary)
# against the value. A model that has not learned to recall can do no better than
# guess a value: chance is 1/32.
#
# Sequence `i` of a set is drawn from `np.random.default_rng([seed, i])`. Training
# draws from seed 1; the held-out set from seed 2; the probes of sections 4 and 5
# from seed 3. The probes end with one query at an exact *distance* from its
# pair: the number of positions from the pair's value to the query (the query's
# attention sees the value iff the distance is below W).

# %%
FILLER, KEYS, VALUES = 16, 32, 32          # token ids: fillers, then keys, then values
VOCAB = FILLER + KEYS + VALUES
CHANCE = 1 / VALUES
TRAIN_SEED, HELDOUT_SEED, PROBE_SEED = 1, 2, 3
W = 8 if quick else 16                      # the attention window
REACH = 3 * (W - 1)                         # how far back three stacked attention layers can read
SEQ_LEN = 32 if quick else 64               # training positions per sequence
MAX_PAIRS = 4 if quick else 8               # N of a training sequence: uniform in 1..MAX_PAIRS


class Recall:
    """Seeded MQAR sequences of seq_len + 1 tokens, read by train.train_step as it reads
    data.Rows: `at` names the sequences of a batch, `batch` -> ids, targets, mask."""

    def __init__(self, seed, seq_len=SEQ_LEN, max_pairs=MAX_PAIRS):
        self.seed, self.seq_len, self.max_pairs = seed, seq_len, max_pairs

    def sequence(self, i):
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.integers(1, self.max_pairs + 1))
        keys = FILLER + rng.choice(KEYS, n, replace=False)
        values = FILLER + KEYS + rng.integers(0, VALUES, n)
        free = self.seq_len + 1 - 4 * n                  # filler positions: n pairs and n queries fill the rest
        # the filler between pairs and queries: none, up to W, or up to all there is, a third each
        gap = int(rng.integers(0, [0, min(free, W), free][rng.integers(3)] + 1))
        asked = rng.permutation(n)
        tokens = np.concatenate([rng.integers(0, FILLER, free - gap), np.stack([keys, values], 1).ravel(),
                                 rng.integers(0, FILLER, gap), np.stack([keys[asked], values[asked]], 1).ravel()])
        mask = np.zeros(self.seq_len, np.float32)
        mask[self.seq_len + 1 - 2 * n::2] = 1            # inputs that are queried keys; targets their values
        return tokens, mask

    def at(self, position, batch_size, seed):
        return range(position, position + batch_size)   # one endless stream: no sequence is seen twice

    def batch(self, rows):
        tokens, masks = zip(*(self.sequence(i) for i in rows))
        tokens = np.stack(tokens)
        return tokens[:, :-1], tokens[:, 1:], np.stack(masks)


def probes(n, distance, count, seq_len=SEQ_LEN):
    """count sequences of seq_len tokens: n pairs, filler, and one query at the end, `distance`
    positions after its pair's value. -> ids [count, seq_len], the pairs' values [count, n]
    and the pair asked [count]. The pair asked is uniform among those that fit: the last
    pairs for a short distance, the first ones when a later pair would not fit."""
    ids, values, asked = [], [], []
    for i in range(count):
        rng = np.random.default_rng([PROBE_SEED, n, distance, i])
        keys = FILLER + rng.choice(KEYS, n, replace=False)
        values.append(FILLER + KEYS + rng.integers(0, VALUES, n))
        # pair j's value stands 2 (n - j) - 1 positions before the first filler after the pairs
        fits = [j for j in range(n) if 2 * (n - j) - 1 <= distance and 2 * j + distance + 2 <= seq_len]
        asked.append(int(rng.choice(fits)))
        gap = distance - (2 * (n - asked[-1]) - 1)
        body = np.concatenate([np.stack([keys, values[-1]], 1).ravel(), rng.integers(0, FILLER, gap),
                               keys[asked[-1]:asked[-1] + 1]])
        ids.append(np.concatenate([rng.integers(0, FILLER, seq_len - len(body)), body]))
    return np.stack(ids), np.stack(values), np.array(asked)


def name(t):
    return "." if t < FILLER else f"k{t - FILLER}" if t < FILLER + KEYS else f"v{t - FILLER - KEYS}"


example_ids, example_targets, example_mask = Recall(TRAIN_SEED).batch([0])
example = " ".join(name(t) for t in example_ids[0])
answers = " ".join(f"{name(x)}->{name(y)}" for x, y, m in zip(example_ids[0], example_targets[0], example_mask[0]) if m)
probe_ids, probe_values, probe_asked = probes(3, 8, 1)
rep.md(f"""
A training sequence ({SEQ_LEN} input positions, N = {int(example_mask.sum())}; the answers scored:
{answers}):

```
{example}
```

A probe (N = 3, distance 8; the answer is {name(probe_values[0, probe_asked[0]])}):

```
{" ".join(name(t) for t in probe_ids[0])}
```
""")

# %% [markdown]
# ## 2. Three models of one size
#
# All three have d_model 64, three layers, four heads of 16 dimensions and the
# SwiGLU FFN of 256; the only difference is `attention_every_n`:
#
# | attention_every_n | layers | |
# |---|---|---|
# | 0 | R R R | all recurrent: Hawk, Griffin's recurrent-only model |
# | 1 | A A A | all sliding-window attention, W = 16 |
# | 3 | R R A | the Chimera hybrid (every third layer attention) |
#
# To make the parameter counts equal, the attention layers have as many key/value
# heads as query heads (`n_kv_heads = n_heads = 4`, no grouping): q, k, v and o
# are then 4 d² parameters, against the RG-LRU's 4 d² + 5 d (three d x d
# projections, the output projection, two gate biases, `lambda_param`, `h0` and the
# state's norm). Swapping a layer changes the count by 5 d = 320 of about
# 203,000. The embedding (80 tokens, tied to the output head) is the same in all.

# %%
WIDTH, HEADS = (32, 2) if quick else (64, 4)
BASE = replace(wyrd.get_config("nano"), vocab_size=VOCAB, d_model=WIDTH, n_layers=3, n_heads=HEADS,
               n_kv_heads=HEADS, sliding_window=W, max_seq_len=256)
MODELS = [(0, "all recurrent"), (1, "all attention"), (3, "hybrid")]
configs = {n: replace(BASE, attention_every_n=n) for n, _ in MODELS}
layout = {n: "".join("A" if c.is_attention(i) else "R" for i in range(c.n_layers)) for n, c in configs.items()}
params = {n: wyrd.Chimera(c, seed=0).num_params() for n, c in configs.items()}
state_bytes = {n: wyrd.Chimera(c, seed=0).init_state(1).nbytes() for n, c in configs.items()}
spread = (max(params.values()) - min(params.values())) / min(params.values())
rep.table(["model", "attention_every_n", "layers", "parameters", "decoding state (bytes, one sequence)"],
          [[label, str(n), layout[n], params[n], state_bytes[n]] for n, label in MODELS])
rep.md(f"The largest has {spread:.2%} more parameters than the smallest.")
rep.record(params={str(n): params[n] for n in params}, layouts={str(n): layout[n] for n in layout},
           state_bytes={str(n): state_bytes[n] for n in state_bytes}, window=W, d_model=WIDTH, chance=CHANCE,
           vocab=VOCAB)

# %% [markdown]
# ## 3. Training
#
# Each model trains with `train.train_step`, the step `train.py` itself runs: the
# forward and backward pass, `clip_grad_norm` at 1, `AdamW` (weight decay 0.1 on
# matrices) at the learning rate `lr_at` gives (linear warmup, cosine decay to a
# tenth of the peak). Every model sees the same sequences in the same order, from
# initial weights drawn with the same seed. Every 50 steps we measure the accuracy
# on 256 held-out sequences of the training distribution (seed 2). The time is the
# CPU time of the training steps (one thread), which depends less than wall time
# on what else the machine runs; each model has a budget of three CPU minutes.
#
# All attention learns slowest, and these settings were tried on it before the
# ones below (held-out accuracy at the end, with an earlier mix of filler lengths:
# up to W in half the sequences, up to all the room in the other half). Peak lr
# 1e-2: at chance after 400 steps, with up to 12 pairs, and also at d_model 128
# with two heads; 5e-3: 17% after 600 steps; 2e-3: 24%, as 3e-3 (up to 8 pairs).
# Up to 12 pairs instead of 8: 12% after 500 steps, and 9% with batches of 16
# for 800 steps. Two heads of 32 dimensions instead of four of 16: 24%, no change.
# One filler token instead of 16: 9%. The filler mix used here, with the queries
# right after the pairs in a third of the sequences, takes it off chance about
# 50 steps sooner.

# %%
CFG = replace(train.PRETRAIN, steps=180 if quick else 600, batch_size=16 if quick else 32, seq_len=SEQ_LEN,
              lr=3e-3, min_lr=3e-4, warmup=10 if quick else 30, weight_decay=0.1, grad_clip=1.0, seed=0)
EVAL_EVERY = 60 if quick else 50
HELDOUT = Recall(HELDOUT_SEED).batch(range(64 if quick else 256))


def predict(model, ids, rows=64):
    """Greedy predictions at every position, [B, T]."""
    with no_grad():
        return np.concatenate([model(ids[i:i + rows]).data.argmax(-1) for i in range(0, len(ids), rows)])


def pct(v):
    return f"{v:.0%}"


def accuracy(model, ids, targets, mask):
    return float(((predict(model, ids) == targets) * mask).sum() / mask.sum())


def train_model(n):
    model = wyrd.Chimera(configs[n], seed=CFG.seed)
    opt = train.AdamW(model.named_parameters(), weight_decay=CFG.weight_decay)
    data = Recall(TRAIN_SEED)
    curve, losses, cpu = [(0, accuracy(model, *HELDOUT))], [], 0.0
    for step in range(CFG.steps):
        t = time.process_time()
        loss, _ = train.train_step(model, opt, data, CFG, step)
        cpu += time.process_time() - t
        losses.append(loss)
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == CFG.steps:
            curve.append((step + 1, accuracy(model, *HELDOUT)))
            print(f"{layout[n]} step {step + 1}: loss {np.mean(losses[-EVAL_EVERY:]):.3f}, "
                  f"held-out accuracy {curve[-1][1]:.3f}, {cpu:.0f} CPU s", flush=True)
    return model, dict(curve=curve, cpu_s=cpu, final_loss=float(np.mean(losses[-20:])), heldout=curve[-1][1])


models, runs = {}, {}
for n, label in MODELS:
    models[n], runs[n] = train_model(n)
tokens = CFG.steps * CFG.batch_size * CFG.seq_len
rep.md(f"""
{CFG.steps} steps of {CFG.batch_size} sequences x {CFG.seq_len} positions ({tokens:,} tokens, about
{tokens * (MAX_PAIRS + 1) / 2 / CFG.seq_len / 1000:.0f}k answers), peak lr {CFG.lr:g}, warmup {CFG.warmup}
steps, N uniform in 1..{MAX_PAIRS}.
""")
rep.table(["model", "layers", "CPU time (s)", "final train loss (nats)", "held-out accuracy"],
          [[label, layout[n], runs[n]["cpu_s"], runs[n]["final_loss"], runs[n]["heldout"]] for n, label in MODELS])
rep.figure("06_training.svg", svg.line_plot(
    None, [{"label": f"{label} ({layout[n]})", "x": [s for s, _ in runs[n]["curve"]],
            "y": [a for _, a in runs[n]["curve"]], "marker": True} for n, label in MODELS],
    title="Held-out recall during training", xlabel="optimizer step", ylabel="accuracy on the answers",
    ylim=(0, 1), hlines=[(CHANCE, "chance")], legend="top left"), "held-out accuracy during training")
rep.record(runs={str(n): runs[n] for n in runs}, train=dict(steps=CFG.steps, batch_size=CFG.batch_size,
                                                            seq_len=CFG.seq_len, lr=CFG.lr, max_pairs=MAX_PAIRS))

# %% [markdown]
# ## 4. Recall against distance
#
# Probes with N = 4 pairs and one query at a set distance from its pair, from 1
# (the query right after the value) to 56, beyond three windows. From 7 to 56 any
# of the four pairs can be the one asked; below 7 only the later ones can (a query
# cannot stand inside the pairs). The expectation: all attention near-perfect
# inside the window and at chance beyond it; all recurrent degrading smoothly
# with distance; the hybrid keeping the inside-window recall and carrying some of
# it beyond.
#
# One caveat for attention beyond W: a stack of L window layers reaches L (W - 1)
# positions back, as each layer can pass on what it read from the one below (a
# filler position can copy a pair that its own window saw). For three attention
# layers that is 45 positions, the second dashed line. The hybrid's one attention
# layer reads 15 positions back, but what it reads already holds the recurrent
# layers' summary of everything before.

# %%
PROBES = 96 if quick else 400
N_DISTANCE = 4
DISTANCES = [1, 4, 7, 8, 16, 24, 28] if quick else [1, 2, 4, 8, 12, 15, 16, 20, 24, 30, 32, 40, 45, 48, 56]
ANSWERS = ["right", "the first pair's value", "the last pair's value", "another pair's value",
           "no value of the sequence"]


def answers(model, n, distance):
    """Counts of each kind of answer (ANSWERS) to the probes at (n, distance)."""
    ids, values, asked = probes(n, distance, PROBES)
    guess = predict(model, ids)[:, -1]
    kind = np.select([guess == values[np.arange(PROBES), asked], guess == values[:, 0], guess == values[:, -1],
                      (guess[:, None] == values).any(1)], [0, 1, 2, 3], 4)
    return np.bincount(kind, minlength=len(ANSWERS))


def recall(model, n, distance):
    return float(answers(model, n, distance)[0] / PROBES)


kinds = {n: [answers(models[n], N_DISTANCE, D) for D in DISTANCES] for n, _ in MODELS}
by_distance = {n: [float(k[0] / PROBES) for k in kinds[n]] for n in kinds}
rep.table(["distance"] + [f"{label} ({layout[n]})" for n, label in MODELS],
          [[str(D)] + [by_distance[n][i] for n, _ in MODELS] for i, D in enumerate(DISTANCES)])
rep.figure("06_distance.svg", svg.line_plot(
    None, [{"label": f"{label} ({layout[n]})", "x": DISTANCES, "y": by_distance[n], "marker": True}
           for n, label in MODELS],
    title=f"Recall against distance (N = {N_DISTANCE} pairs, W = {W})", xlabel="distance from the value to its query",
    ylabel="accuracy", ylim=(0, 1), hlines=[(CHANCE, "chance")],
    vlines=[(W - 0.5, "W"), (REACH + 0.5, "3 (W - 1)")]), "recall against distance")
rep.record(distances=DISTANCES, n_for_distances=N_DISTANCE, probes=PROBES,
           by_distance={str(n): by_distance[n] for n in by_distance})

# %% [markdown]
# ## 5. Recall against the number of pairs
#
# Probes at one distance beyond every model's attention reach (48 positions:
# more than 3 (W - 1) = 45), with N from 1 to 8 pairs, the most training shows.
# Here only a recurrent state can hold the pair, so its capacity shows: recall
# should fall as N grows.

# %%
FAR = REACH + 3
PAIRS = [1, 2, 4] if quick else [1, 2, 3, 4, 6, 8]
by_pairs = {n: [recall(models[n], N, FAR) for N in PAIRS] for n, _ in MODELS}
rep.table(["pairs N"] + [f"{label} ({layout[n]})" for n, label in MODELS] + ["1 / N"],
          [[str(N)] + [by_pairs[n][i] for n, _ in MODELS] + [1 / N] for i, N in enumerate(PAIRS)])
rep.figure("06_pairs.svg", svg.line_plot(
    None, [{"label": f"{label} ({layout[n]})", "x": PAIRS, "y": by_pairs[n], "marker": True} for n, label in MODELS]
    + [{"label": "1 / N", "x": PAIRS, "y": [1 / N for N in PAIRS], "dash": "6 4", "color": "#888"}],
    title=f"Recall against the number of pairs (distance {FAR})", xlabel="pairs N",
    ylabel="accuracy", ylim=(0, 1), hlines=[(CHANCE, "chance")]), "recall against the number of pairs")
rep.record(far=FAR, pairs=PAIRS, by_pairs={str(n): by_pairs[n] for n in by_pairs})

# %% [markdown]
# ## 6. What the wrong answers are
#
# Over all the probes of section 4, the share of each model's answers that are
# the right value, the value of another pair of the sequence (the first pair,
# the last, or one between), or no value of the sequence at all. A model that has
# learned that the answer is one of the sequence's values, but not which, answers
# with other pairs' values.

# %%
share = {n: sum(kinds[n]) / sum(kinds[n]).sum() for n in kinds}              # of ANSWERS, over section 4
rep.table(["model"] + ANSWERS, [[f"{label} ({layout[n]})"] + [float(c) for c in share[n]] for n, label in MODELS])
rep.record(answer_share={str(n): share[n].tolist() for n in share})

# %% [markdown]
# ## 7. Recall and decoding memory
#
# What a model keeps to decode (`model.init_state(1).nbytes()`, `wyrd.DecodeState`)
# is all it can recall from: per recurrent layer the state `h` (d floats), per
# attention layer the last W keys and values. Neither grows with the context.

# %%
inside = [i for i, D in enumerate(DISTANCES) if D < W]
between = [i for i, D in enumerate(DISTANCES) if W <= D <= REACH]
beyond = [i for i, D in enumerate(DISTANCES) if D > REACH]
memory = {n: dict(inside=float(np.mean([by_distance[n][i] for i in inside])),
                  between=float(np.mean([by_distance[n][i] for i in between])),
                  beyond=float(np.mean([by_distance[n][i] for i in beyond])),
                  most_pairs=by_pairs[n][-1]) for n, _ in MODELS}
rep.table(["model", "layers", "decoding state (bytes)", f"recall inside W (distance < {W})",
           f"distance {W}-{REACH}", f"beyond {REACH}", f"N = {PAIRS[-1]} at distance {FAR}"],
          [[label, layout[n], state_bytes[n], memory[n]["inside"], memory[n]["between"], memory[n]["beyond"],
            memory[n]["most_pairs"]] for n, label in MODELS])
rep.md(f"""
Each column of recall is the mean over the distances of section 4 in that range, N = {N_DISTANCE}. A
recurrent layer keeps {WIDTH} floats, {WIDTH * 4} bytes; an attention layer keeps {2 * W} x {WIDTH} floats of keys
and values, {2 * W * WIDTH * 4:,} bytes. All attention keeps {state_bytes[1] / state_bytes[0]:.0f} times the
all-recurrent model's state and recalls {pct(memory[1]['beyond'])} beyond {REACH}; the all-recurrent model's
{state_bytes[0]} bytes recall {pct(memory[0]['beyond'])} there.
""")
rep.record(memory={str(n): memory[n] for n in memory})

# %% [markdown]
# ## 8. Against the expectation
#
# The expectation was: all attention near-perfect inside W and at chance beyond;
# all recurrent degrading smoothly with distance; the hybrid keeping the
# inside-window recall and carrying some beyond; recall beyond W falling as N
# grows. What was measured:

# %%
rec, att, hyb = memory[0], memory[1], memory[3]
since = runs[1]["curve"][-3][0]
moved = runs[1]["heldout"] - runs[1]["curve"][-3][1]
best = DISTANCES[int(np.argmax(by_distance[1]))]
far_d = [D for D in DISTANCES if D >= 8]
rec_far = [by_distance[0][DISTANCES.index(D)] for D in far_d]
one_pair = max(abs(r - 1 / N) for n in (0, 3) for r, N in zip(by_pairs[n], PAIRS))
edge = DISTANCES.index(W - 1)
follows = max(abs(h - r) for h, r in zip(by_distance[3], by_distance[0]))


rep.md(f"""
**All attention** recalls {pct(att['inside'])} of the pairs inside its window (chance {pct(CHANCE)}),
{"near-perfect, as expected" if att['inside'] >= 0.9 else
 f"far from the near-perfect recall expected. After {CFG.steps} steps it has learned part of the task: "
 f"of its answers, {pct(sum(share[1][1:4]))} are the value of another pair of the sequence (the first pair's: "
 f"{pct(share[1][1])}) and {pct(share[1][4])} no value of the sequence; "
 + ("its held-out accuracy was still rising" if moved > 0.02 else "its held-out accuracy had levelled off")
 + f" ({pct(runs[1]['curve'][-3][1])} at step {since}, {pct(runs[1]['heldout'])} at step {CFG.steps})"}.
Its recall is uneven across distances, best at {best} ({pct(max(by_distance[1]))}){
 ", the farthest key its window holds" if best == W - 1 else ""}.
Between W and {REACH} it recalls {pct(att['between'])}{
 ": its stacked layers pass pairs on through the filler, as section 4 allowed" if att['between'] > 2 * CHANCE
 else ""}; beyond {REACH}, {pct(att['beyond'])}: {"chance, as expected, since nothing there reaches it"
 if att['beyond'] < 2 * CHANCE else "above chance, which its state cannot explain (a bug to look for)"}.

**All recurrent** recalls {pct(rec['inside'])} inside W, {pct(rec['between'])} between W and {REACH} and
{pct(rec['beyond'])} beyond. From distance {far_d[0]} to {far_d[-1]} it stays between {pct(min(rec_far))}
and {pct(max(rec_far))}: {"a smooth decline, as expected" if rec_far[0] - rec_far[-1] > 0.1 else
 "nearly flat, not the decline expected. How long ago it saw the pair matters little next to how many pairs "
 "it must hold (section 5)"}.

**The hybrid** recalls {pct(hyb['inside'])} inside W and {pct(hyb['beyond'])} beyond {REACH} (all attention
{pct(att['inside'])} and {pct(att['beyond'])}, all recurrent {pct(rec['inside'])} and {pct(rec['beyond'])}).
{"It carries recall beyond the window, as expected" if hyb['beyond'] > 2 * CHANCE else
 "It carries nothing beyond the window, against the expectation"}{
 f", but its attention layer adds nothing visible inside it: at every distance its recall is within "
 f"{follows:.0%} of the all-recurrent model's" if follows < 0.1 else
 ", and its attention layer adds to its recall inside the window" if hyb['inside'] > rec['inside'] + 0.1 else ""}.

**Against N**, at distance {FAR}: all recurrent {", ".join(pct(r) for r in by_pairs[0])} and the hybrid
{", ".join(pct(r) for r in by_pairs[3])} for N = {", ".join(str(N) for N in PAIRS)}: {
 "falling as N grows, as expected" if by_pairs[0][-1] < by_pairs[0][0] - 0.2 else "not falling with N"}{
 f", and close to 1/N throughout (at most {one_pair * 100:.0f} points from it): the state holds about one pair, "
 "and a query for any other is answered with a value of the sequence, rarely the right one"
 if one_pair < 0.12 else ""}.
All attention is at {pct(np.mean(by_pairs[1]))} there: the pairs are out of its reach.

""")
if all(by_distance[n][0] < by_distance[n][edge] - 0.05 for n in by_distance):
    rep.md(f"""
None of the three recalls best right after the pair: at distance 1, where the query follows its own
value, {", ".join(f"{layout[n]} {pct(by_distance[n][0])}" for n, _ in MODELS)}, against
{", ".join(f"{layout[n]} {pct(by_distance[n][edge])}" for n, _ in MODELS)} at distance {W - 1}.
""")
rep.save()
