"""A DeepSeek-V3-style model run by `switchyard run` on every transport, against a float64
NumPy computation of the same model written here from the checkpoint's own bytes (nothing of
Switchyard's router, loader, FP8 decoding or reference is used for the expected values).

The checkpoint has four layers in DeepSeek-V3's naming; layer 0 is dense (its MLP is never
read) and layers 1-3 are MoE layers: a BF16 router gate with an F32
`e_score_correction_bias`, sigmoid scores, group-limited selection (4 groups, 2 kept, top-4,
groups scored by their two best biased scores), the selected scores renormalised and
scaled by 2.5, and a shared expert. Every expert matrix, the shared expert's included, is
FP8 E4M3 with a `weight_scale_inv` F32 tensor of one scale per 128x128 block, as DeepSeek
publishes them; H and F are not multiples of 128, so the last blocks are partial."""
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

from test_models import (from_bf16_bits, relative, run_config, to_bf16_bits,
                         write_safetensors)

TOOL = os.environ["SWITCHYARD_TOOL"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")

LAYERS, MOE_LAYERS = 4, (1, 2, 3)
E, H, F, FS, TOP_K, GROUPS, KEPT_GROUPS, SCALE, T = 16, 192, 136, 160, 4, 4, 2, 2.5, 40
BLOCK = 128


def e4m3_values():
    """The values of the 127 non-negative finite FP8 E4M3 (fn) codes 0x00..0x7e, from the
    format's definition: bias 7, 3 mantissa bits, subnormals at exponent 0, no infinities,
    0x7f is NaN."""
    values = []
    for code in range(0x7f):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(mantissa / 8 * 2.0 ** -6)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.array(values)


E4M3 = e4m3_values()


def quantize_fp8(w):
    """w [rows, cols] -> (FP8 codes uint8, scales f32 [ceil(rows/128), ceil(cols/128)]) as
    DeepSeek-V3 stores a weight: per 128x128 block, scale = amax / 448 and each element the
    code nearest to w / scale. Returns also the dequantised matrix in float64."""
    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    scales = np.zeros((br, bc), np.float32)
    codes = np.zeros((rows, cols), np.uint8)
    for i in range(br):
        for j in range(bc):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            scales[i, j] = np.float32(np.abs(block).max() / 448.0)
            q = block / np.float64(scales[i, j])
            nearest = np.abs(np.abs(q)[..., None] - E4M3).argmin(axis=-1)
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (
                nearest | np.where(q < 0, 0x80, 0)).astype(np.uint8)
    return codes, scales


def dequantize_fp8(codes, scales):
    """The float64 value of stored FP8 codes times their blocks' scales."""
    magnitude = E4M3[codes & 0x7f]
    value = np.where(codes & 0x80, -magnitude, magnitude)
    block_scale = np.repeat(np.repeat(scales.astype(np.float64), BLOCK, 0), BLOCK, 1)
    return value * block_scale[:codes.shape[0], :codes.shape[1]]


def make_checkpoint(folder, seed=7):
    """Writes the two-shard checkpoint; returns per MoE layer the float64 weights as stored."""
    rng = np.random.default_rng(seed)
    shards = ({}, {})
    layers = []

    def fp8_matrix(shard, name, shape):
        w = rng.standard_normal(shape) / np.sqrt(shape[1])
        codes, scales = quantize_fp8(w)
        shard[name + ".weight"] = ("F8_E4M3", codes)
        shard[name + ".weight_scale_inv"] = ("F32", scales)
        return dequantize_fp8(codes, scales)

    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.mlp."
        shard = shards[0 if layer < 2 else 1]
        if layer not in MOE_LAYERS:  # a dense MLP: Switchyard must not read it
            for name in ("gate_proj", "up_proj", "down_proj"):
                shard[prefix + name + ".weight"] = ("F8_E4M3", np.full((4, 4), 0x7f, np.uint8))
            continue
        gate_bits = to_bf16_bits(rng.standard_normal((E, H)) / np.sqrt(H))
        shard[prefix + "gate.weight"] = ("BF16", gate_bits)
        bias = (rng.standard_normal(E) * 0.05).astype(np.float32)
        shard[prefix + "gate.e_score_correction_bias"] = ("F32", bias)
        experts = []
        for e in range(E):
            # Layer 2's upper half of the experts lives in the other shard.
            where = shards[1] if (layer == 2 and e >= E // 2) else shard
            experts.append([fp8_matrix(where, prefix + f"experts.{e}.{name}", shape)
                            for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)),
                                                ("down_proj", (H, F)))])
        shared = [fp8_matrix(shard, prefix + f"shared_experts.{name}", shape)
                  for name, shape in (("gate_proj", (FS, H)), ("up_proj", (FS, H)),
                                      ("down_proj", (H, FS)))]
        layers.append((from_bf16_bits(gate_bits), bias.astype(np.float64), experts, shared))
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for shard, name in zip(shards, names):
        write_safetensors(os.path.join(folder, name), shard)
        weight_map.update({tensor: name for tensor in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return layers


def swiglu(w, x):
    g, u, d = w
    a = x @ g.T
    return (a / (1 + np.exp(-a)) * (x @ u.T)) @ d.T


def deepseek_v3_float64(layers, x):
    """DeepSeek-V3's MoE layer per layer (its MoEGate and the shared expert), chained, in
    float64. Also returns the smallest relative gap between a decision's last kept and
    first dropped candidate (groups and experts), so that the test knows float32 cannot
    decide any differently."""
    h = x.astype(np.float64)
    smallest_gap = np.inf
    per_group = E // GROUPS
    for gate, bias, experts, shared in layers:
        scores = 1 / (1 + np.exp(-(h @ gate.T)))
        choice = scores + bias
        group_scores = np.sort(choice.reshape(len(h), GROUPS, per_group), axis=2)[:, :, -2:]
        group_scores = group_scores.sum(axis=2)
        out = np.zeros_like(h)
        for t in range(len(h)):
            group_order = np.argsort(-group_scores[t], kind="stable")
            ranked = group_scores[t, group_order]
            smallest_gap = min(smallest_gap, (ranked[KEPT_GROUPS - 1] - ranked[KEPT_GROUPS]))
            allowed = np.full(E, -np.inf)
            for g in group_order[:KEPT_GROUPS]:
                allowed[g * per_group:(g + 1) * per_group] = 0
            masked = choice[t] + allowed
            order = np.argsort(-masked, kind="stable")
            smallest_gap = min(smallest_gap, masked[order[TOP_K - 1]] - masked[order[TOP_K]])
            chosen = order[:TOP_K]
            weights = scores[t, chosen] / (scores[t, chosen].sum() + 1e-20) * SCALE
            for e, w in zip(chosen, weights):
                out[t] += w * swiglu(experts[e], h[t])
            out[t] += swiglu(shared, h[t])
        h = out
    return h, smallest_gap


CONFIG = """
[runtime]
transport = "{transport}"
timeout_s = 60
{ranks}
{ep_size}

[router]
policy = "node_limited"
score = "sigmoid"
top_k = {top_k}
num_groups = {groups}
max_groups = {kept_groups}
scale = {scale}

[model]
weights = "{weights}"
format = "deepseek"
prefix = "model.layers.{{layer}}.mlp."
layers = "1-3"

[input]
tokens = "{tokens}"
"""


@pytest.fixture(scope="module")
def model_case():
    with tempfile.TemporaryDirectory() as d:
        layers = make_checkpoint(d)
        x = np.random.default_rng(11).standard_normal((T, H)).astype(np.float32)
        np.save(os.path.join(d, "x.npy"), x)
        expected, gap = deepseek_v3_float64(layers, x)
        yield d, expected, gap


def run_model(folder, name, transport, launcher=(), ranks=None, ep_size=None, check=False):
    text = CONFIG.format(
        transport=transport, ranks=f"ranks = {ranks}" if ranks else "",
        ep_size=f"ep_size = {ep_size}" if ep_size else "", top_k=TOP_K, groups=GROUPS,
        kept_groups=KEPT_GROUPS, scale=SCALE,
        weights=os.path.join(folder, "model.safetensors.index.json"),
        tokens=os.path.join(folder, "x.npy"))
    return run_config(folder, name, text, launcher, ("--check",) if check else ())


def test_the_test_data_has_no_routing_near_ties(model_case):
    _, _, gap = model_case
    assert gap > 1e-5, "another seed: float32 could route a token differently"


def test_fp8_codes_round_trip():
    # The test's own FP8 tables: 448 is the largest value, 2^-9 the smallest subnormal.
    assert E4M3.max() == 448 and E4M3[1] == 2.0 ** -9 and len(set(E4M3)) == 127
    w = np.random.default_rng(3).standard_normal((130, 260))
    codes, scales = quantize_fp8(w)
    assert scales.shape == (2, 3)
    assert relative(dequantize_fp8(codes, scales), w) < 0.07  # 3 mantissa bits


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_in_process_worlds(model_case, ranks):
    folder, expected, _ = model_case
    y, stdout = run_model(folder, f"inproc{ranks}", "inproc", ranks=ranks)
    assert "model: 3 MoE layers (1,2,3)" in stdout, stdout
    assert ("expert weights: f8_e4m3 with 128x128 block scales; a shared expert "
            f"(ffn_hidden {FS}) on every token's own rank") in stdout, stdout
    assert relative(y, expected) <= 1e-2
    # The FP8 weights are used exactly as stored: far closer than the 1e-2 allowed.
    assert relative(y, expected) <= 1e-4


def test_run_check_compares_with_the_dense_reference(model_case):
    folder, _, _ = model_case
    _, stdout = run_model(folder, "checked", "inproc", ranks=2, check=True)
    assert "PASS" in stdout, stdout


def test_ep_by_dp_and_the_same_bytes_on_every_transport(model_case):
    folder, expected, _ = model_case
    y, _ = run_model(folder, "inproc_dp", "inproc", ranks=4, ep_size=2)
    assert relative(y, expected) <= 1e-2
    if not MPIRUN:
        pytest.skip("mpirun and the MPI/UCX transports were not built")
    y_mpi, _ = run_model(folder, "mpi", "mpi", ep_size=2,
                         launcher=(MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca",
                                   "btl", "self,vader", "-np", "4"))
    y_ucx, _ = run_model(folder, "ucx", "ucx", ep_size=2,
                         launcher=(TOOL, "launch", "-n", "4", "--"))
    assert y_mpi.tobytes() == y.tobytes()
    assert y_ucx.tobytes() == y.tobytes()


def test_the_backward_through_fp8_and_shared_experts(model_case):
    """`switchyard backward` on the model: gradients of every layer's gate, routed experts
    (with respect to their dequantised FP8 values) and shared experts, named as the
    checkpoint names the weights; the same on 1 and 3 in-process ranks (the gradients
    themselves are checked against central differences in core_model_backward)."""
    from test_backward import read_safetensors
    folder, _, _ = model_case
    dy = os.path.join(folder, "dy.npy")
    np.save(dy, np.random.default_rng(12).standard_normal((T, H)).astype(np.float32))
    results = []
    for ranks in (1, 3):
        config = os.path.join(folder, f"inproc{ranks}.toml")
        if not os.path.exists(config):
            run_model(folder, f"inproc{ranks}", "inproc", ranks=ranks)
        out = os.path.join(folder, f"grads{ranks}")
        done = subprocess.run([TOOL, "backward", config, "--grad-output", dy, "--out", out],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        results.append((np.load(os.path.join(out, "dx.npy")),
                        read_safetensors(os.path.join(out, "d_model.safetensors"))))
    (dx1, g1), (dx3, g3) = results
    for layer in MOE_LAYERS:
        prefix = f"model.layers.{layer}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert prefix + f"shared_experts.{name}.weight" in g1
        assert prefix + f"experts.{E - 1}.down_proj.weight" in g1
    assert set(g1) == set(g3)
    assert relative(dx3, dx1.astype(np.float64)) <= 1e-5
    for name, g in g1.items():
        assert np.isfinite(g).all(), name
        assert relative(g3[name], g.astype(np.float64)) <= 1e-5, name


def test_save_model_keeps_the_shared_experts(model_case):
    """`save_model` (through the Python module) writes the shared experts too, dequantised:
    the saved model loads back and gives the same output."""
    import switchyard
    folder, expected, _ = model_case
    config = os.path.join(folder, "inproc2.toml")
    if not os.path.exists(config):
        run_model(folder, "inproc2", "inproc", ranks=2)
    saved = os.path.join(folder, "saved.safetensors")
    switchyard.Runtime(config).save_model(saved)
    y, stdout = run_model(folder, "reloaded", "inproc", ranks=2)
    with open(os.path.join(folder, "reloaded.toml")) as f:
        text = f.read().replace(os.path.join(folder, "model.safetensors.index.json"), saved)
    with open(os.path.join(folder, "reloaded.toml"), "w") as f:
        f.write(text)
    out = os.path.join(folder, "reloaded.npy")
    done = subprocess.run([TOOL, "run", os.path.join(folder, "reloaded.toml"), "--set",
                           "output.path=" + out], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a shared expert (ffn_hidden" in done.stdout and "f32" in done.stdout, done.stdout
    assert relative(np.load(out), expected) <= 1e-4
