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


def gate_central_differences(x, dy, gate, experts, chosen, score_weights, step=1e-5):
    """d Σ(y · dy) / d gate of `numpy_layer`, by central differences in float64."""
    numeric = np.zeros_like(gate)
    for i in np.ndindex(gate.shape):
        plus, minus = gate.copy(), gate.copy()
        plus[i] += step
        minus[i] -= step
        numeric[i] = ((numpy_layer(x, plus, experts, chosen, score_weights) * dy).sum()
                      - (numpy_layer(x, minus, experts, chosen, score_weights) * dy).sum()) \
            / (2 * step)
    return numeric


def check_layer(runtime, x, dy, y, d_gate, choose):
    """The runtime's y and gate gradient against the layer in float64 with its own weights:
    the experts `choose(logits)` gives, weighted by the normalised √softplus of their logits
    times 1.5 (the configuration's scale)."""
    gate, expert_weights = runtime.parameters()
    gate = gate.astype(np.float64)
    experts = [tuple(m.astype(np.float64) for m in e) for e in expert_weights]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    chosen = choose(x64 @ gate.T)

    def weights_of(z):
        s = sqrt_softplus(np.take_along_axis(z, chosen, axis=1))
        return 1.5 * s / (s.sum(axis=1, keepdims=True) + 1e-20)

    assert np.abs(numpy_layer(x64, gate, experts, chosen, weights_of) - y).max() <= 1e-5
    numeric = gate_central_differences(x64, dy64, gate, experts, chosen, weights_of)
    assert np.abs(d_gate - numeric).max() <= 1e-4 * np.abs(numeric).max()


def test_sqrtsoftplus_gate_gradient_equals_central_differences():
    runtime = switchyard.Runtime.from_string(layer_config())
    runtime.training = True
    x = np.random.default_rng(1).standard_normal((T, H)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((T, H)).astype(np.float32)
    y = runtime.forward(x)
    _, d_gate, _ = runtime.backward(x, dy)
    check_layer(runtime, x, dy, y, d_gate, lambda z: numpy_topk(z, K, np.zeros(E), 1.5)[0])


V = 11  # the hash table's vocabulary


def hash_table(seed=7, k=K):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(E)[:k] for _ in range(V)]).astype(np.int32)


def numpy_hash(z, table, ids, score, normalize, scale):
    """DeepSeek-V4's hash routing in float64: the table's experts of each token's id, the
    score of its logits there."""
    z = z.astype(np.float64)
    chosen = table[ids].astype(np.int64)
    if score == "softmax":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        s = p / p.sum(axis=1, keepdims=True)
    elif score == "sigmoid":
        s = 1 / (1 + np.exp(-z))
    else:
        s = sqrt_softplus(z)
    w = np.take_along_axis(s, chosen, axis=1)
    if normalize:
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return chosen, w * scale


@pytest.fixture()
def table_file():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tid2eid.npy")
        np.save(path, hash_table())
        yield path


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("normalize", [False, True])
def test_hash_routing_equals_numpy(table_file, score, normalize):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((30, E)) * 2).astype(np.float32)
    ids = rng.integers(0, V, 30)
    experts, weights = switchyard.route(logits, "hash", table=table_file, token_ids=ids,
                                        score=score, normalize=normalize, scale=1.5)
    chosen, expected = numpy_hash(logits, hash_table(), ids, score, normalize, 1.5)
    assert np.array_equal(experts, chosen)
    assert np.abs(weights - expected).max() <= 1e-6 * np.abs(expected).max()
    # int32 ids too; the router's K is the table's.
    router = switchyard.Router("hash", num_experts=E, table=table_file, score=score)
    assert router.slots == K
    assert np.array_equal(router.route(logits, token_ids=ids.astype(np.int32))[0], chosen)


def test_hash_routing_refuses_ids_outside_the_table_and_bad_tables(table_file):
    logits = np.zeros((5, E), np.float32)
    with pytest.raises(ValueError, match=r"router hash: token 3 has id 11, outside the table's "
                                         r"ids 0\.\.10"):
        switchyard.route(logits, "hash", table=table_file, token_ids=np.array([0, 1, 2, 11, 4]))
    with pytest.raises(ValueError, match="token 0 has id -1"):
        switchyard.route(logits, "hash", table=table_file, token_ids=np.array([-1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="no token ids were given"):
        switchyard.route(logits, "hash", table=table_file)
    with pytest.raises(ValueError, match=r"router hash token ids: expected i64\[5\]"):
        switchyard.route(logits, "hash", table=table_file, token_ids=np.arange(4))
    directory = os.path.dirname(table_file)
    for name, table, message in [
        ("twice.npy", np.array([[1, 1]], np.int32), "row 0 names expert 1 twice"),
        ("outside.npy", np.array([[0, 6]], np.int32), r"row 0 names expert 6, outside 0\.\.5"),
        ("float.npy", np.zeros((3, 2), np.float32), r"must be int32 \[V, k\]"),
    ]:
        path = os.path.join(directory, name)
        np.save(path, table)
        with pytest.raises(ValueError, match=message):
            switchyard.Router("hash", num_experts=E, table=path)
    with pytest.raises(ValueError, match="must equal the table's 2 columns"):
        switchyard.Router("hash", num_experts=E, table=table_file, top_k=3)


def test_a_hash_layer_forward_and_gate_gradient_against_numpy(table_file):
    # DeepSeek-V4's first layers: the experts by the token's id, the weights by the gate.
    runtime = switchyard.Runtime.from_string(layer_config(
        f'policy = "hash"\ntable = "{table_file}"\n'))
    runtime.training = True
    x = np.random.default_rng(1).standard_normal((T, H)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((T, H)).astype(np.float32)
    ids = np.random.default_rng(3).integers(0, V, T)
    y = runtime.forward(x, token_ids=ids)
    _, d_gate, _ = runtime.backward(x, dy)
    chosen = hash_table()[ids]
    check_layer(runtime, x, dy, y, d_gate, lambda z: chosen)
    # Without the ids the layer says what it needs; the runtime still works.
    with pytest.raises(ValueError, match="no token ids were given"):
        runtime.forward(x)
    assert runtime.route(x, token_ids=ids)[0].tolist() == chosen.tolist()


def test_switchyard_route_takes_token_ids(table_file):
    import subprocess
    tool = os.environ["SWITCHYARD_TOOL"]
    with tempfile.TemporaryDirectory() as d:
        logits = np.random.default_rng(4).standard_normal((9, E)).astype(np.float32)
        ids = np.random.default_rng(5).integers(0, V, 9)
        np.save(os.path.join(d, "logits.npy"), logits)
        np.save(os.path.join(d, "ids.npy"), ids)
        with open(os.path.join(d, "hash.toml"), "w") as f:
            f.write(f'[router]\npolicy = "hash"\ntable = "{table_file}"\n')
        done = subprocess.run([tool, "route", os.path.join(d, "hash.toml"), "--logits",
                               os.path.join(d, "logits.npy"), "--token-ids",
                               os.path.join(d, "ids.npy"), "--out", os.path.join(d, "out")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert np.array_equal(np.load(os.path.join(d, "out", "experts.npy")), hash_table()[ids])
        np.save(os.path.join(d, "ids.npy"), np.full(9, V))
        done = subprocess.run([tool, "route", os.path.join(d, "hash.toml"), "--logits",
                               os.path.join(d, "logits.npy"), "--token-ids",
                               os.path.join(d, "ids.npy"), "--out", os.path.join(d, "out")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "token 0 has id 11" in done.stderr
