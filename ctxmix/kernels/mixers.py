"""Numba kernels for the online mixers: Hedge / fixed share, entropy-adaptive alpha, geometric mixing.

Pure functions over NumPy arrays and scalars. Only the ``*_update`` functions mutate anything, and only
the arrays passed to them (the mixer's state and the ``out_*`` arrays). Each sequential loop computes
row t from the state left by rows < t, writes it, and only then lets row t's target move the state
(score before update, rule 3). The Python classes in ``ctxmix/mixers/`` hold the state arrays.

Log weights are kept in the log domain and renormalized after every step, so a run of millions of
positions never underflows or overflows them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Geometric mixing: the exponent of each token is floored at this many nats below the largest one before
# exponentiating, so that every output probability stays > 0 in float64 (exp(-700) ~ 1e-304 > 0; exp(-746)
# underflows). The floor is part of the mixer's definition: full path and stepwise path both apply it, and
# the normalizer sums the floored values, so the output is still a normalized distribution.
GEO_LOG_RATIO_MIN = -700.0
# Geometric weights are kept in this range. Without a bound, a long run of confident wins can drive a
# weight so high that p_k(v)^w underflows for most tokens; negative weights would invert an expert.
GEO_WEIGHT_MIN = 0.0
GEO_WEIGHT_MAX = 16.0


@njit(cache=True)
def softmax_weights(logw):
    """float64[K] log weights (any shift) -> float64[K] normalized weights; reads only ``logw``."""
    k_count = logw.shape[0]
    m = logw[0]
    for k in range(1, k_count):
        if logw[k] > m:
            m = logw[k]
    w = np.empty(k_count)
    total = 0.0
    for k in range(k_count):
        w[k] = math.exp(logw[k] - m)
        total += w[k]
    for k in range(k_count):
        w[k] /= total
    return w


@njit(cache=True)
def share_weights_update(logp, logw, eta, alpha, logw_floor, out_w):
    """Hedge with fixed share (Herbster & Warmuth), position by position.

    ``logp`` float64[T, K]: each expert's log p(target). ``logw`` float64[K]: log weights, mutated (left
    normalized: logsumexp(logw) = 0, unless ``logw_floor`` is finite). ``out_w`` float64[T, K]: mutated,
    row t = the weights used at t = softmax(logw) before row t's update.

    Update after row t: logw += eta * logp[t] (multiplicative weights, w_k *= p_k(target)^eta), normalize;
    with ``alpha`` > 0 mix alpha of the uniform weight back in: w = (1 - alpha) w + alpha / K. With
    ``logw_floor`` finite (PR #909's clip at -20), logw is shifted so max = 0 and clipped below at the floor.
    ``alpha`` = 0 and ``logw_floor`` = -inf give plain Hedge: w_t proportional to prod_{s<t} p_k,s^eta.
    """
    n_rows, k_count = logp.shape
    share = alpha / k_count
    keep = 1.0 - alpha
    for t in range(n_rows):
        w = softmax_weights(logw)
        for k in range(k_count):
            out_w[t, k] = w[k]
        for k in range(k_count):
            logw[k] += eta * logp[t, k]
        m = logw[0]
        for k in range(1, k_count):
            if logw[k] > m:
                m = logw[k]
        total = 0.0
        for k in range(k_count):
            total += math.exp(logw[k] - m)
        lse = m + math.log(total)
        for k in range(k_count):
            logw[k] -= lse
        if alpha > 0.0:
            for k in range(k_count):
                logw[k] = math.log(keep * math.exp(logw[k]) + share)
        if logw_floor > -math.inf:
            m = logw[0]
            for k in range(1, k_count):
                if logw[k] > m:
                    m = logw[k]
            for k in range(k_count):
                logw[k] = max(logw[k] - m, logw_floor)


@njit(cache=True)
def adaptive_alpha(entropy, order, a, b, s, c, d, min_order):
    """PR #909's entropy-adaptive n-gram weight, per position; reads only its arguments.

    ``entropy`` float64[T]: the base expert's entropy (nats). ``order`` float64[T]: the n-gram expert's
    matched order (0: none). Returns float64[T]:
    alpha = a + b * sigmoid(s * (H - (c - d * (order - min_order)))) where order >= min_order, else 0
    (PR #909 uses the base model alone where no n-gram order matched).
    """
    n_rows = entropy.shape[0]
    alpha = np.empty(n_rows)
    for t in range(n_rows):
        if order[t] < min_order:
            alpha[t] = 0.0
        else:
            x = s * (entropy[t] - (c - d * (order[t] - min_order)))
            # 1 / (1 + exp(-x)): exp overflows to inf for x << 0, giving exactly 0, which is the limit.
            alpha[t] = a + b / (1.0 + math.exp(-x))
    return alpha


@njit(cache=True)
def log_table(p):
    """float64[K, V] probabilities -> float64[K, V] natural logs (one implementation for every path)."""
    k_count, vocab = p.shape
    logp = np.empty((k_count, vocab))
    for k in range(k_count):
        for v in range(vocab):
            logp[k, v] = math.log(p[k, v])
    return logp


@njit(cache=True)
def geometric_mix_logp(logp, w):
    """float64[K, V] log p, float64[K] weights -> float64[V]: p(v) proportional to exp(sum_k w_k logp_k(v)).

    The exponent is shifted by its maximum and floored at ``GEO_LOG_RATIO_MIN`` below it, so every entry is
    > 0 and the sum never overflows.
    """
    k_count, vocab = logp.shape
    z = np.zeros(vocab)
    for k in range(k_count):
        wk = w[k]
        for v in range(vocab):
            z[v] += wk * logp[k, v]
    m = z[0]
    for v in range(1, vocab):
        if z[v] > m:
            m = z[v]
    total = 0.0
    for v in range(vocab):
        z[v] = math.exp(max(z[v] - m, GEO_LOG_RATIO_MIN))
        total += z[v]
    for v in range(vocab):
        z[v] /= total
    return z


@njit(cache=True)
def geometric_mix(p, w):
    """float64[K, V] probabilities, float64[K] weights -> float64[V] geometric mix (no state)."""
    return geometric_mix_logp(log_table(p), w)


@njit(cache=True)
def geometric_weights_update(p, targets, sets, w, lr, out_p, out_w):
    """Geometric (PAQ-style logistic) mixing with weights trained online on log loss.

    ``p`` float64[T, K, V]: experts' distributions. ``targets`` int64[T]. ``sets`` int64[T]: which weight
    set row t uses (a small causal context, e.g. the matched n-gram order; all 0 for one set).
    ``w`` float64[S, K]: weight sets, mutated. ``out_p`` float64[T, V], ``out_w`` float64[T, K]: mutated,
    row t = the mixed distribution and the weights used at t, both computed before row t's update.

    After row t the selected set takes one gradient step on -log p_mix(target):
    d/dw_k = E_{p_mix}[log p_k] - log p_k(target); weights are then clamped to
    [GEO_WEIGHT_MIN, GEO_WEIGHT_MAX].
    """
    n_rows, k_count, vocab = p.shape
    for t in range(n_rows):
        st = sets[t]
        logp = log_table(p[t])
        q = geometric_mix_logp(logp, w[st])
        for v in range(vocab):
            out_p[t, v] = q[v]
        for k in range(k_count):
            out_w[t, k] = w[st, k]
        target = targets[t]
        for k in range(k_count):
            expected = 0.0
            for v in range(vocab):
                expected += q[v] * logp[k, v]
            grad = expected - logp[k, target]
            w[st, k] = min(max(w[st, k] - lr * grad, GEO_WEIGHT_MIN), GEO_WEIGHT_MAX)
