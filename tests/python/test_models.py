"""Models of several MoE layers read from a Hugging Face sharded checkpoint, run by
`switchyard run` on every transport, against a float64 NumPy computation of the same model
written here from the checkpoint's own tensors (nothing of Switchyard's router, loader or
reference is used to get the expected values).

The checkpoint: a 4-layer model in Qwen3-MoE naming (`model.layers.{l}.mlp.gate.weight`,
`...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`), every tensor BF16, over two shards
with `model.safetensors.index.json`; layer 2's experts are split between the shards, and
the dense tensors beside them (attention, norms) are never read."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

TOOL = os.environ["SWITCHYARD_TOOL"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")

LAYERS, E, H, F, TOP_K, T = 4, 8, 32, 48, 2, 61


def to_bf16_bits(a):
    """float32 -> bf16 bits, rounding to nearest even (the test's own conversion)."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype name, numpy array of the stored bytes' type)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        dtype, array = tensors[name]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def stored(a, dtype):
    """a as the checkpoint stores it in `dtype` ("BF16" or "F32"): (dtype, stored array)."""
    return (dtype, to_bf16_bits(a) if dtype == "BF16" else np.asarray(a, np.float32))


def widened(entry):
    dtype, array = entry
    return from_bf16_bits(array) if dtype == "BF16" else array.astype(np.float64)


def make_checkpoint(folder, seed=26, dtype="BF16"):
    """Writes the sharded checkpoint with every tensor in `dtype`; returns the weights as
    float64 per layer."""
    rng = np.random.default_rng(seed)
    shards = ({}, {})
    weights = []
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        # Dense neighbours a real checkpoint has; Switchyard must not need them.
        shards[layer % 2][prefix + "self_attn.q_proj.weight"] = stored(
            rng.standard_normal((H, H)) * 0.1, dtype)
        shards[layer % 2][prefix + "post_attention_layernorm.weight"] = stored(np.ones(H), dtype)
        gate = stored(rng.standard_normal((E, H)) * 2.0 / np.sqrt(H), dtype)
        shards[layer // 2][prefix + "mlp.gate.weight"] = gate
        experts = []
        for e in range(E):
            # Layer 2 spans both shards: its odd experts live in the second one.
            shard = shards[1] if (layer == 2 and e % 2) else shards[layer // 2]
            mats = [stored(rng.standard_normal(shape) / np.sqrt(shape[1]), dtype)
                    for shape in ((F, H), (F, H), (H, F))]
            for name, m in zip(("gate_proj", "up_proj", "down_proj"), mats):
                shard[prefix + f"mlp.experts.{e}.{name}.weight"] = m
            experts.append([widened(m) for m in mats])
        weights.append((widened(gate), experts))
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for shard, name in zip(shards, names):
        write_safetensors(os.path.join(folder, name), shard)
        weight_map.update({tensor: name for tensor in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return weights


def qwen3_moe_float64(weights, x):
    """Qwen3-MoE's sparse block per layer (softmax over all experts, top-k, the k weights
    renormalised, SwiGLU experts), chained; float64. Also returns the smallest gap between
    a token's k-th and (k+1)-th logit (relative to the largest logit of the layer), so that
    the test knows its routing has no near-tie that float32 could resolve the other way."""
    h = x.astype(np.float64)
    smallest_gap = np.inf
    for gate, experts in weights:
        logits = h @ gate.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        order = np.argsort(-logits, axis=1, kind="stable")
        ranked = np.take_along_axis(logits, order, axis=1)
        gaps = (ranked[:, TOP_K - 1] - ranked[:, TOP_K]) / np.abs(logits).max()
        smallest_gap = min(smallest_gap, float(gaps.min()))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            chosen = order[t, :TOP_K]
            w = p[t, chosen] / p[t, chosen].sum()
            for e, weight in zip(chosen, w):
                g, u, d = experts[e]
                a = g @ h[t]
                out[t] += weight * (d @ (a / (1 + np.exp(-a)) * (u @ h[t])))
        h = out
    return h, smallest_gap


CONFIG = """
[runtime]
transport = "{transport}"
{ranks}
{ep_size}

[router]
policy = "topk"
top_k = {top_k}
normalize = true

[experts]
kernel = "cpu_swiglu"

[model]
weights = "{weights}"
format = "deepseek"
prefix = "model.layers.{{layer}}.mlp."
layers = "0-{last}"

[input]
tokens = "{tokens}"
"""


@pytest.fixture(scope="module")
def model_case():
    with tempfile.TemporaryDirectory() as d:
        weights = make_checkpoint(d)
        x = np.random.default_rng(9).standard_normal((T, H)).astype(np.float32)
        np.save(os.path.join(d, "x.npy"), x)
        expected, gap = qwen3_moe_float64(weights, x)
        yield d, x, expected, gap


def run_config(folder, name, text, launcher=(), extra=()):
    """Writes `text` as NAME.toml in `folder`, runs `switchyard run` on it (under
    `launcher`, with `extra` arguments) into NAME.npy; returns that output and stdout."""
    config = os.path.join(folder, name + ".toml")
    out = os.path.join(folder, name + ".npy")
    with open(config, "w") as f:
        f.write(text)
    command = list(launcher) + [TOOL, "run", config, "--set", "output.path=" + out, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return np.load(out), done.stdout


def run_model(folder, name, transport, launcher=None, ranks=None, ep_size=None):
    text = CONFIG.format(
        transport=transport, ranks=f"ranks = {ranks}" if ranks else "",
        ep_size=f"ep_size = {ep_size}" if ep_size else "", top_k=TOP_K,
        weights=os.path.join(folder, "model.safetensors.index.json"),
        last=LAYERS - 1, tokens=os.path.join(folder, "x.npy"))
    launchers = {"mpirun": (MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca", "btl",
                            "self,vader", "-np", "2"),
                 "launch": (TOOL, "launch", "-n", "2", "--")}
    return run_config(folder, name, text, launchers.get(launcher, ()))


def relative(y, expected):
    return np.abs(y.astype(np.float64) - expected).max() / np.abs(expected).max()


def test_the_test_data_has_no_routing_near_ties(model_case):
    _, _, _, gap = model_case
    assert gap > 1e-5, "another seed: float32 could route a token differently"


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_a_sharded_four_layer_model_in_process(model_case, ranks):
    folder, _, expected, _ = model_case
    y, stdout = run_model(folder, f"inproc{ranks}", "inproc", ranks=ranks)
    assert "model: 4 MoE layers (0,1,2,3)" in stdout
    assert "sharded checkpoint" in stdout and "(2 shards)" in stdout
    assert relative(y, expected) <= 1e-3


def test_ep_by_dp_in_process_and_the_same_bytes_on_every_transport(model_case):
    folder, _, expected, _ = model_case
    y4, _ = run_model(folder, "inproc_dp", "inproc", ranks=4, ep_size=2)
    assert relative(y4, expected) <= 1e-3
    y2, _ = run_model(folder, "inproc_2", "inproc", ranks=2)
    if not MPIRUN:
        pytest.skip("mpirun and the MPI/UCX transports were not built")
    y_mpi, _ = run_model(folder, "mpi", "mpi", launcher="mpirun")
    y_ucx, _ = run_model(folder, "ucx", "ucx", launcher="launch")
    assert y_mpi.tobytes() == y2.tobytes()
    assert y_ucx.tobytes() == y2.tobytes()


def test_run_check_compares_the_chain_with_the_dense_reference(model_case):
    folder, _, _, _ = model_case
    _, stdout = run_model(folder, "checked", "inproc", ranks=3)
    config = os.path.join(folder, "checked.toml")
    done = subprocess.run([TOOL, "run", config, "--check"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check:" in done.stdout and "PASS" in done.stdout
    for layer in range(LAYERS):
        assert f"layer {layer} routing: imbalance" in done.stdout


def test_the_python_module_takes_a_layer_index(model_case):
    import switchyard
    folder, x, expected, _ = model_case
    config = os.path.join(folder, "inproc2.toml")
    if not os.path.exists(config):
        run_model(folder, "inproc2", "inproc", ranks=2)
    rt = switchyard.Runtime(config)
    assert rt.num_layers == LAYERS
    assert rt.layer_ids == list(range(LAYERS))
    h = x
    for layer in range(LAYERS):
        h = rt.forward(h, layer=layer)
        assert rt.stats(layer=layer)["tokens"] == T
    assert relative(h, expected) <= 1e-3
    experts, weights = rt.route(x, layer=3)
    assert experts.shape == (T, TOP_K)
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        rt.forward(x, layer=4)

def test_a_qwen2_moe_shared_expert_with_its_sigmoid_gate():
    """Qwen2-MoE's block: the routed experts (softmax, top-k, not renormalised) plus
    sigmoid(x · shared_expert_gate) times the shared expert, BF16, one layer."""
    rng = np.random.default_rng(5)
    fs = 40
    tensors, w = {}, {}
    prefix = "model.layers.0.mlp."

    def bf16(name, shape, scale):
        bits = to_bf16_bits(rng.standard_normal(shape) * scale)
        tensors[prefix + name] = ("BF16", bits)
        w[name] = from_bf16_bits(bits)

    bf16("gate.weight", (E, H), 2.0 / np.sqrt(H))
    for e in range(E):
        for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
            bf16(f"experts.{e}.{name}.weight", shape, 1 / np.sqrt(shape[1]))
    for name, shape in (("gate_proj", (fs, H)), ("up_proj", (fs, H)), ("down_proj", (H, fs))):
        bf16(f"shared_expert.{name}.weight", shape, 1 / np.sqrt(shape[1]))
    bf16("shared_expert_gate.weight", (1, H), 1 / np.sqrt(H))
    x = np.random.default_rng(6).standard_normal((T, H)).astype(np.float32)
    h = x.astype(np.float64)

    def swiglu(names, row):
        g, u, d = (w[n] for n in names)
        a = g @ row
        return d @ (a / (1 + np.exp(-a)) * (u @ row))

    logits = h @ w["gate.weight"].T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = np.zeros_like(h)
    for t in range(T):
        order = np.argsort(-p[t], kind="stable")
        assert p[t, order[TOP_K - 1]] - p[t, order[TOP_K]] > 1e-5  # no near-tie
        for e in order[:TOP_K]:
            expected[t] += p[t, e] * swiglu([f"experts.{e}.{n}.weight" for n in
                                             ("gate_proj", "up_proj", "down_proj")], h[t])
        shared = swiglu([f"shared_expert.{n}.weight" for n in
                         ("gate_proj", "up_proj", "down_proj")], h[t])
        expected[t] += shared / (1 + np.exp(-(w["shared_expert_gate.weight"][0] @ h[t])))
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        np.save(os.path.join(d, "x.npy"), x)
        with open(os.path.join(d, "qwen2.toml"), "w") as f:
            f.write(f'[runtime]\nranks = 3\n[router]\ntop_k = {TOP_K}\n'
                    f'[model]\nweights = "{d}"\nformat = "deepseek"\nprefix = "{prefix}"\n'
                    f'[input]\ntokens = "{os.path.join(d, "x.npy")}"\n')
        out = os.path.join(d, "y.npy")
        done = subprocess.run([TOOL, "run", os.path.join(d, "qwen2.toml"), "--check", "--set",
                               "output.path=" + out], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sigmoid-gated" in done.stdout and "PASS" in done.stdout, done.stdout
        assert relative(np.load(out), expected) <= 1e-5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
