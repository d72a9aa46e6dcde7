"""Draw the architecture figures of docs/architecture.md into docs/figures/.

    python docs/make_figures.py            # rewrites docs/figures/*.svg
    python docs/make_figures.py --out DIR  # somewhere else (the tests compare with the committed ones)

The figures are data: the layer pattern is read from wyrd.ChimeraConfig, so a
change of the presets shows up here (and in the test that keeps them in sync).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import svg  # noqa: E402
from wyrd import get_config  # noqa: E402

REC, ATT, NORM, FFN, IO = "#dbe9f6", "#fde2c8", "#eeeeee", "#e3f1de", "#f4f4f4"


def layer_stack(path):
    """The model from token ids to logits, one block opened up, and both temporal mixes."""
    cfg = get_config("medium")
    c = svg.Canvas(980, 730)
    c.text(490, 26, "Chimera / Wyrd: the layer stack (medium preset, 16 layers)", 16, "middle", weight="bold")

    # -- left: the whole model, bottom to top like the data flow -------------------
    x0, w = 30, 210
    c.box(x0, 640, w, 40, "token ids", IO, sublabel="[B, T] int")
    c.box(x0, 580, w, 40, "embed_tokens", IO, sublabel="lookup → x [B, T, d]")
    c.arrow(x0 + w / 2, 640, x0 + w / 2, 621)
    h = 26
    y = 560
    for i in range(cfg.n_layers):
        yy = y - (i + 1) * h
        att = cfg.is_attention(i)
        c.rect(x0 + 20, yy + 2, w - 40, h - 4, fill=ATT if att else REC, stroke="#667", rx=3)
        c.text(x0 + w / 2, yy + h / 2 + 4, f"{i}: {'local attention' if att else 'RG-LRU'} + FFN", 11, "middle")
    stack_top = y - cfg.n_layers * h
    c.arrow(x0 + w / 2, 580, x0 + w / 2, 561)
    c.box(x0, stack_top - 50, w, 36, "norm (RMSNorm)", NORM)
    c.arrow(x0 + w / 2, stack_top, x0 + w / 2, stack_top - 13)
    c.box(x0, stack_top - 110, w, 40, "x @ embed_tokens.T", IO, sublabel="tied lm_head → logits [B, T, V]")
    c.arrow(x0 + w / 2, stack_top - 50, x0 + w / 2, stack_top - 69)
    c.text(x0 + w / 2, 702, f"layer i is attention iff (i + 1) % {cfg.attention_every_n} == 0", 11, "middle",
           color="#555")
    # the tied weight: the same matrix at both ends
    c.line(x0 + w, 600, x0 + w + 12, 600, "#a33", 1.2, "4 3")
    c.line(x0 + w + 12, 600, x0 + w + 12, stack_top - 90, "#a33", 1.2, "4 3")
    c.arrow(x0 + w + 12, stack_top - 90, x0 + w + 1, stack_top - 90, "#a33")
    c.text(x0 + w + 16, 330, "same matrix", 10, color="#a33", rotate=90)

    # -- middle: one block -----------------------------------------------------------
    bx, bw = 320, 250
    yb = 560 - 3 * h  # block 2, the first attention layer, is the one opened up
    c.line(x0 + w - 20, yb + 2, bx - 10, 120, "#99a", 1, "3 3")
    c.line(x0 + w - 20, yb + h - 2, bx - 10, 650, "#99a", 1, "3 3")
    c.rect(bx - 10, 120, bw + 20, 530, fill="#fafafa", stroke="#99a", rx=8)
    c.text(bx + bw / 2, 142, "Block (pre-norm residual)", 13, "middle", weight="bold")
    cx = bx + 90  # the branch column; the residual stream runs at the right
    rx = bx + bw - 30
    c.text(rx, 646, "x", 12, "middle", weight="bold")
    c.line(rx, 634, rx, 160, "#333", 2)
    c.arrow(rx, 175, rx, 160, "#333", 2)

    def branch(entry, norm, y_norm, mix, sub, fill, y_mix, two_kinds=False):
        """One residual half: x -> norm -> mix, added back into the stream."""
        for (label, sublabel, f, yy) in [(norm, "RMSNorm", NORM, y_norm), (mix, sub, fill, y_mix)]:
            c.box(cx - 70, yy, 140, 46, label, f, sublabel=sublabel)
        if two_kinds:  # half RG-LRU colour, half attention colour
            c.rect(cx - 70, y_mix, 70, 46, fill=ATT, stroke="none", opacity=0.6)
            c.box(cx - 70, y_mix, 140, 46, mix, "none", sublabel=sub)
        c.line(rx, entry, cx, entry, "#333", 1.2)
        c.arrow(cx, entry, cx, y_norm + 47)
        c.arrow(cx, y_norm, cx, y_mix + 47)
        c.line(cx, y_mix, cx, y_mix - 30, "#333", 1.2)
        c.arrow(cx, y_mix - 30, rx - 10, y_mix - 30)
        c.circle(rx, y_mix - 30, 10, "white", "#333")
        c.text(rx, y_mix - 25, "+", 14, "middle", weight="bold")

    branch(625, "norm1", 560, "temporal_mix", "RG-LRU or attention", REC, 470, two_kinds=True)  # x + temporal_mix(norm1(x))
    branch(422, "norm2", 360, "ffn", "w2(silu(w1 x) * w3 x)", FFN, 270)          # x + ffn(norm2(x))
    c.text(rx + 14, 300, "residual stream", 10, color="#555", rotate=90)
    c.text(cx, 642, "all shapes [B, T, d]", 10, "middle", color="#555")

    # -- right: the two temporal mixes ---------------------------------------------
    px, pw = 620, 340
    c.rect(px, 60, pw, 300, fill=REC, stroke="#557", rx=8)
    c.text(px + 12, 82, "RG-LRU (recurrent layers)", 13, weight="bold")
    lines = ["xp  = input_proj(x)",
             "i_t = sigmoid(input_gate_proj(x))",
             "r_t = sigmoid(recurrence_gate_proj(x))",
             "log a = log(sigmoid(lambda_param) + 1e-8)",
             "a_t = exp(c r_t log a)        c = 8",
             "u_t = sqrt(1 - a_t² + 1e-6) (i_t xp_t)",
             "h_t = a_t h_(t-1) + u_t   h_-1 = h0 (scan)",
             "y   = output_proj(norm(h))",
             "",
             "per channel, in parallel over d;",
             "decoding keeps h [B, d]: O(1) in T"]
    for k, s in enumerate(lines):
        c.text(px + 14, 108 + 22 * k, s, 12, family="DejaVu Sans Mono, monospace")
    c.rect(px, 380, pw, 270, fill=ATT, stroke="#755", rx=8)
    c.text(px + 12, 402, "Local attention (every 3rd layer)", 13, weight="bold")
    lines = ["q = RoPE(q_proj(x))      [B, T, H, D]",
             "k = RoPE(k_proj(x))      [B, T, KV, D]",
             "v = v_proj(x)            [B, T, KV, D]",
             "head h reads kv head h // (H / KV)",
             "s sees t - W < s <= t    W = 512",
             "o = softmax(q·k / sqrt(D)) v",
             "y = o_proj(o)            [B, T, d]",
             "",
             "decoding keeps the last W keys and",
             "values in a ring buffer: O(1) in T"]
    for k, s in enumerate(lines):
        c.text(px + 14, 428 + 22 * k, s, 12, family="DejaVu Sans Mono, monospace")
    c.line(bx + 20, 493, px, 220, "#557", 1, "3 3")
    c.line(bx + 20, 493, px, 515, "#755", 1, "3 3")
    return c.save(path)


def window_mask(path, T=12, W=4):
    """Which keys each query sees: causal and at most W back (itself included)."""
    cell = 26
    c = svg.Canvas(80 + cell * T + 200, 90 + cell * T)
    c.text(40 + cell * T / 2, 24, f"Sliding-window causal mask, T = {T}, W = {W}", 14, "middle", weight="bold")
    ox, oy = 60, 60
    c.text(ox + cell * T / 2, oy - 12, "key position s →", 11, "middle")
    c.text(ox - 40, oy + cell * T / 2, "query position t →", 11, "middle", rotate=90)
    for t in range(T):
        for s in range(T):
            seen = t - W < s <= t
            c.rect(ox + s * cell, oy + t * cell, cell - 2, cell - 2, fill="#f28e2b" if seen else
                   ("#f3f3f3" if s <= t else "white"), stroke="#ccc" if not seen else "none")
        c.text(ox - 6, oy + t * cell + cell * 0.65, str(t), 10, "end", color="#555")
        c.text(ox + t * cell + cell / 2 - 1, oy + cell * T + 14, str(t), 10, "middle", color="#555")
    lx = ox + cell * T + 20
    c.rect(lx, oy, 16, 16, fill="#f28e2b", stroke="none")
    c.text(lx + 22, oy + 12, "attended", 11)
    c.rect(lx, oy + 26, 16, 16, fill="#f3f3f3", stroke="#ccc")
    c.text(lx + 22, oy + 38, "past, out of window", 11)
    c.rect(lx, oy + 52, 16, 16, fill="white", stroke="#ccc")
    c.text(lx + 22, oy + 64, "future (causal)", 11)
    c.text(lx, oy + 100, "work and memory per query:", 11)
    c.text(lx, oy + 116, "O(W), not O(t)", 11, weight="bold")
    return c.save(path)


FIGURES = {"layer_stack.svg": layer_stack, "window_mask.svg": window_mask}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "figures"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(os.path.join(args.out, name))
        print("wrote", os.path.join(args.out, name))
