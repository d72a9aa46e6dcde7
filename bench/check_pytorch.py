"""Cross-check against an independent PyTorch Chimera (run by hand; needs torch and safetensors).

    pip install torch safetensors && python bench/check_pytorch.py

Writes the model a second time in PyTorch (straight from docs/architecture.md,
sharing no code with wyrd.py), then checks both directions:
  1. a Wyrd checkpoint loads into it with the `safetensors` library and strict
     load_state_dict, and its logits equal ours;
  2. weights saved from PyTorch with safetensors.torch.save_file load with
     checkpoint.load, and our logits equal PyTorch's.
Neither torch nor safetensors is a Wyrd dependency; this script is the only user.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import wyrd  # noqa: E402
import checkpoint  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RGLRU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.c = cfg.c
        self.input_proj = nn.Linear(d, d, bias=False)
        self.input_gate_proj = nn.Linear(d, d)
        self.recurrence_gate_proj = nn.Linear(d, d)
        self.lambda_param = nn.Parameter(torch.empty(d).uniform_(4, 9))
        self.h0 = nn.Parameter(torch.zeros(1, 1, d))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.output_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        xp = self.input_proj(x)
        i = torch.sigmoid(self.input_gate_proj(x))
        r = torch.sigmoid(self.recurrence_gate_proj(x))
        log_a = torch.log(torch.sigmoid(self.lambda_param) + 1e-8)
        a = torch.exp(self.c * r * log_a)
        u = torch.sqrt(1 - a * a + 1e-6) * (i * xp)
        return self.output_proj(self.norm(parallel_scan(a, u, self.h0[:, 0])))


def parallel_scan(a, u, h0):
    """h_t = a_t h_{t-1} + u_t, h_{-1} = h0, as a PyTorch user writes it without a loop
    over time: fold h0 into u_0, then Hillis-Steele doubling, log2(T) elementwise passes.
    After the pass with offset k, (A_t, h_t) compose the last 2k steps ending at t:
    h_t += A_t h_{t-k}, A_t *= A_{t-k}."""
    h = torch.cat([u[:, :1] + a[:, :1] * h0[:, None], u[:, 1:]], 1)
    A, k = a, 1
    while k < a.shape[1]:
        h = torch.cat([h[:, :k], h[:, k:] + A[:, k:] * h[:, :-k]], 1)
        A = torch.cat([A[:, :k], A[:, k:] * A[:, :-k]], 1)
        k *= 2
    return h


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, KV, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, KV * D, bias=False)
        self.v_proj = nn.Linear(d, KV * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        H, KV, D, W = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim, self.cfg.sliding_window
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)
        inv = self.cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        rot = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        mask = (j <= i) & (j > i - W)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps), RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.temporal_mix = Attention(cfg) if (i + 1) % cfg.attention_every_n == 0 else RGLRU(cfg)
        self.ffn = FFN(cfg)

    def forward(self, x):
        x = x + self.temporal_mix(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TorchChimera(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def main():
    torch.manual_seed(0)
    cfg = wyrd.ChimeraConfig(vocab_size=300, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2,
                             sliding_window=8, max_seq_len=64)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))  # T = 30 > W = 8
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Wyrd -> PyTorch
        ours = wyrd.Chimera(cfg, seed=1)
        for p in ours.parameters():  # move off the init so h0, biases and norms matter
            p.data += np.random.default_rng(2).normal(0, 0.05, p.shape).astype(np.float32)
        path = os.path.join(tmp, "wyrd.safetensors")
        checkpoint.save(path, ours)
        sd = load_file(path)
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
        theirs = TorchChimera(cfg)
        theirs.load_state_dict(sd, strict=True)
        with torch.no_grad():
            want = theirs(torch.from_numpy(ids)).numpy()
        got = ours(ids).data
        err1 = np.abs(got - want).max() / np.abs(want).max()
        print(f"Wyrd checkpoint -> PyTorch (strict load): max relative logit difference {err1:.2e}")
        # 2. PyTorch -> Wyrd
        theirs = TorchChimera(cfg)
        for p in theirs.parameters():
            torch.nn.init.normal_(p, 0, 0.1) if p.ndim > 1 else torch.nn.init.normal_(p, 1, 0.1)
        sd = {k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
        path2 = os.path.join(tmp, "torch.safetensors")
        save_file(sd, path2, metadata={"config": json.dumps(cfg.to_dict())})
        ours2, _, _ = checkpoint.load(path2)
        with torch.no_grad():
            want = theirs(torch.from_numpy(ids)).numpy()
        err2 = np.abs(ours2(ids).data - want).max() / np.abs(want).max()
        print(f"PyTorch safetensors -> Wyrd: max relative logit difference {err2:.2e}")
    ok = err1 < 1e-4 and err2 < 1e-4
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
