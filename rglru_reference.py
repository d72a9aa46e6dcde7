"""The RG-LRU written as three plain ops, in the order of its equations
(docs/architecture.md §3.2), each with its own Numba kernels and backward:

    rglru_decay   a_t = exp(c r_t log a),  r_t = sigmoid(z_r)
    rglru_input   u_t = sqrt(1 - a_t^2 + 1e-6) (i_t xp_t),  i_t = sigmoid(z_i)
    rglru_scan    h_t = a_t h_{t-1} + u_t,  h_{-1} = h0

wyrd.rglru runs all three as one kernel each way (one pass over time needs no
[B, T, d] temporaries between them). These are the same maths a step at a time:
the tests check the fused kernel against them, and docs/02 takes them apart.
"""
import math

from autograd import FAST, N_PARTIAL, Tensor, sigmoid

import numpy as np
from numba import njit, prange

from wyrd import SCAN_BLOCK, rglru_log_a


@njit(parallel=True, cache=True, fastmath=FAST)
def decay_backward_kernel(ga, a, r, c_log_a, c, gz, glog_a):
    """a = exp(c r log_a), r = sigmoid(z), rows [N, d].
    da/dz = a c log_a r (1 - r);  da/dlog_a = a c r (summed over rows, per chunk)."""
    N, d = a.shape
    P = glog_a.shape[0]
    for part in prange(P):
        for n in range(part * N // P, (part + 1) * N // P):
            for j in range(d):
                t = ga[n, j] * a[n, j]
                gz[n, j] = t * c_log_a[j] * r[n, j] * (1.0 - r[n, j])
                glog_a[part, j] += t * c * r[n, j]


def rglru_decay(z, lambda_param, c):
    """a_t = exp(c r_t log_a) = a^(c r_t), with r_t = sigmoid(z) and
    log_a = log(sigmoid(lambda) + 1e-8) <= 0. z [B, T, d], lambda [d]."""
    d = z.shape[-1]
    log_a, dlog_a = rglru_log_a(lambda_param.data)
    c_log_a = (c * log_a).astype(z.dtype)
    r = sigmoid(z.data)
    a = r * c_log_a
    np.exp(a, out=a)

    def backward(g):
        gz, glog_a = np.empty_like(r), np.zeros((N_PARTIAL, d), r.dtype)
        decay_backward_kernel(np.ascontiguousarray(g).reshape(-1, d), a.reshape(-1, d), r.reshape(-1, d),
                              c_log_a, z.dtype.type(c), gz.reshape(-1, d), glog_a)
        z._acc(gz)
        lambda_param._acc((glog_a.sum(axis=0) * dlog_a).astype(z.dtype))
    return Tensor.make(a, (z, lambda_param), backward)


@njit(parallel=True, cache=True, fastmath=FAST)
def input_forward_kernel(a, i, xp, u):
    """u = sqrt(1 - a^2 + 1e-6) i xp, flat arrays."""
    for n in prange(a.size):
        u[n] = math.sqrt(1.0 - a[n] * a[n] + 1e-6) * i[n] * xp[n]


@njit(parallel=True, cache=True, fastmath=FAST)
def input_backward_kernel(gu, a, i, xp, ga, gz, gxp):
    """With m = sqrt(1 - a^2 + 1e-6), u = m i xp, i = sigmoid(z):
    du/da = -a i xp / m,  du/dz = m xp i (1 - i),  du/dxp = m i."""
    for n in prange(a.size):
        m = math.sqrt(1.0 - a[n] * a[n] + 1e-6)
        ga[n] = -gu[n] * a[n] * i[n] * xp[n] / m
        gz[n] = gu[n] * m * xp[n] * i[n] * (1.0 - i[n])
        gxp[n] = gu[n] * m * i[n]


def rglru_input(a, z, xp):
    """u_t = sqrt(1 - a_t^2 + 1e-6) * (i_t * xp_t) with i_t = sigmoid(z)."""
    ad, xd = np.ascontiguousarray(a.data), np.ascontiguousarray(xp.data)
    i = sigmoid(z.data)
    u = np.empty_like(ad)
    input_forward_kernel(ad.reshape(-1), i.reshape(-1), xd.reshape(-1), u.reshape(-1))

    def backward(g):
        ga, gz, gxp = np.empty_like(ad), np.empty_like(ad), np.empty_like(ad)
        input_backward_kernel(np.ascontiguousarray(g).reshape(-1), ad.reshape(-1), i.reshape(-1), xd.reshape(-1),
                              ga.reshape(-1), gz.reshape(-1), gxp.reshape(-1))
        a._acc(ga)
        z._acc(gz)
        xp._acc(gxp)
    return Tensor.make(u, (a, z, xp), backward)


@njit(parallel=True, cache=True, fastmath=FAST)
def scan_forward_kernel(a, u, h0, h):
    """h_t = a_t * h_{t-1} + u_t, h_{-1} = h0. a, u, h [B, T, d]; h0 [B, d].

    Channels are independent, so tasks are (batch, block of channels), each
    walking time in order.
    """
    B, T, d = a.shape
    nblk = (d + SCAN_BLOCK - 1) // SCAN_BLOCK
    for job in prange(B * nblk):
        b = job // nblk
        lo = (job % nblk) * SCAN_BLOCK
        hi = min(lo + SCAN_BLOCK, d)
        for c in range(lo, hi):
            h[b, 0, c] = a[b, 0, c] * h0[b, c] + u[b, 0, c]
        for t in range(1, T):
            for c in range(lo, hi):
                h[b, t, c] = a[b, t, c] * h[b, t - 1, c] + u[b, t, c]


@njit(parallel=True, cache=True, fastmath=FAST)
def scan_backward_kernel(a, h, h0, gh, du, da, dh0):
    """Reverse scan. With g_t = dL/dh_t = gh_t + g_{t+1} a_{t+1} (h_t feeds h_{t+1}):
    dL/du_t = g_t, dL/da_t = g_t h_{t-1}, dL/dh0 = g_0 a_0. du holds g as it goes.
    """
    B, T, d = a.shape
    nblk = (d + SCAN_BLOCK - 1) // SCAN_BLOCK
    for job in prange(B * nblk):
        b = job // nblk
        lo = (job % nblk) * SCAN_BLOCK
        hi = min(lo + SCAN_BLOCK, d)
        for c in range(lo, hi):
            du[b, T - 1, c] = gh[b, T - 1, c]
        for t in range(T - 2, -1, -1):
            for c in range(lo, hi):
                du[b, t, c] = gh[b, t, c] + a[b, t + 1, c] * du[b, t + 1, c]
        for t in range(T - 1, 0, -1):
            for c in range(lo, hi):
                da[b, t, c] = du[b, t, c] * h[b, t - 1, c]
        for c in range(lo, hi):
            da[b, 0, c] = du[b, 0, c] * h0[b, c]
            dh0[b, c] = du[b, 0, c] * a[b, 0, c]


def rglru_scan(a, u, h0):
    """h_t = a_t h_{t-1} + u_t over time. a, u [B, T, d]; h0 broadcastable to [B, d]."""
    B, T, d = a.shape
    ad, ud = np.ascontiguousarray(a.data), np.ascontiguousarray(u.data)
    h0d = np.ascontiguousarray(np.broadcast_to(h0.data.reshape(-1, d), (B, d)))
    h = np.empty_like(ad)
    scan_forward_kernel(ad, ud, h0d, h)

    def backward(g):
        du, da, dh0 = np.empty_like(ad), np.empty_like(ad), np.empty_like(h0d)
        scan_backward_kernel(ad, h, h0d, np.ascontiguousarray(g), du, da, dh0)
        a._acc(da)
        u._acc(du)
        h0._acc(dh0.sum(axis=0).reshape(h0.shape) if h0.data.size == d else dh0.reshape(h0.shape))
    return Tensor.make(h, (a, u, h0), backward)
