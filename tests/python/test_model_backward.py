"""`switchyard backward` through a model of four MoE layers (the 4-layer Qwen3-MoE sharded
checkpoint of test_models.py, stored in F32 so that it can be trained) against PyTorch
autograd of the same chain in float64, written here from the checkpoint's tensors: dx and
every layer's gate and expert gradients within 1e-5 relative on in-process ranks 1-4 and
EP x DP, and the same bits under mpirun (MPI) and `switchyard launch` (UCX)."""
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch

from test_backward import read_safetensors
from test_models import E, LAYERS, T, TOP_K, H, make_checkpoint, qwen3_moe_float64

TOOL = os.environ["SWITCHYARD_TOOL"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")

CONFIG = """
[runtime]
timeout_s = 60
[router]
top_k = {top_k}
normalize = true
[model]
weights = "{weights}"
format = "deepseek"
prefix = "model.layers.{{layer}}.mlp."
layers = "0-{last}"
[input]
tokens = "{tokens}"
"""


def torch_chain_gradients(weights, x, dy):
    """Qwen3-MoE's sparse block per layer in float64 with autograd, chained; returns dx and
    a dict of the checkpoint's tensor names to their gradients of sum(dy * y)."""
    params = {}
    h = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    x_leaf = h
    for layer, (gate, experts) in enumerate(weights):
        prefix = f"model.layers.{layer}.mlp."
        g = params[prefix + "gate.weight"] = torch.tensor(gate, requires_grad=True)
        p = torch.softmax(h @ g.T, dim=1)
        top, chosen = torch.topk(p, TOP_K, dim=1)
        top = top / top.sum(dim=1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(E):
            w = [torch.tensor(m, requires_grad=True) for m in experts[e]]
            for name, m in zip(("gate_proj", "up_proj", "down_proj"), w):
                params[prefix + f"experts.{e}.{name}.weight"] = m
            y_e = (torch.nn.functional.silu(h @ w[0].T) * (h @ w[1].T)) @ w[2].T
            out = out + (top * (chosen == e)).sum(dim=1, keepdim=True) * y_e
        h = out
    (h * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    return x_leaf.grad.numpy(), {k: v.grad.numpy() for k, v in params.items()}


@pytest.fixture(scope="module")
def case():
    with tempfile.TemporaryDirectory() as d:
        weights = make_checkpoint(d, dtype="F32")
        x = np.random.default_rng(9).standard_normal((T, H)).astype(np.float32)
        dy = np.random.default_rng(10).standard_normal((T, H)).astype(np.float32)
        np.save(os.path.join(d, "x.npy"), x)
        np.save(os.path.join(d, "dy.npy"), dy)
        _, gap = qwen3_moe_float64(weights, x)
        assert gap > 1e-5, "another seed: float32 could route a token differently"
        with open(os.path.join(d, "model.toml"), "w") as f:
            f.write(CONFIG.format(top_k=TOP_K, last=LAYERS - 1,
                                  weights=os.path.join(d, "model.safetensors.index.json"),
                                  tokens=os.path.join(d, "x.npy")))
        yield d, torch_chain_gradients(weights, x, dy)


def run_backward(folder, out, launcher=(), sets=()):
    command = list(launcher) + [TOOL, "backward", os.path.join(folder, "model.toml"),
                                "--grad-output", os.path.join(folder, "dy.npy"), "--out", out]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    if launcher:
        return None
    assert f"through {LAYERS} MoE layers" in done.stdout, done.stdout
    assert not os.path.exists(os.path.join(out, "d_gate.npy"))  # one-layer models only
    return np.load(os.path.join(out, "dx.npy")), read_safetensors(
        os.path.join(out, "d_model.safetensors"))


def relative(a, b):
    return np.abs(a.astype(np.float64) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2)])
def test_the_chain_backward_equals_pytorch_autograd(case, world, ep):
    folder, (dx_ref, grads_ref) = case
    with tempfile.TemporaryDirectory() as out:
        dx, grads = run_backward(folder, out, sets=(f"runtime.ranks={world}",
                                                    f"runtime.ep_size={ep}"))
    assert relative(dx, dx_ref) <= 1e-5
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        assert relative(g, grads_ref[name]) <= 1e-5, name


@pytest.mark.skipif(not MPIRUN, reason="mpirun and the MPI/UCX transports were not built")
def test_the_same_bits_under_mpi_and_ucx_with_ep_by_dp(case):
    folder, _ = case
    group = "runtime.ep_size=2"
    with tempfile.TemporaryDirectory() as out:
        inproc = run_backward(folder, os.path.join(out, "inproc"),
                              sets=("runtime.ranks=4", group))
        for transport, launcher in (
                ("mpi", (MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca", "btl",
                         "self,vader", "-np", "4")),
                ("ucx", (TOOL, "launch", "-n", "4", "--"))):
            where = os.path.join(out, transport)
            run_backward(folder, where, launcher=launcher,
                         sets=(f"runtime.transport={transport}", group))
            assert np.load(os.path.join(where, "dx.npy")).tobytes() == inproc[0].tobytes()
            got = read_safetensors(os.path.join(where, "d_model.safetensors"))
            assert set(got) == set(inproc[1])
            for name, g in got.items():
                assert g.tobytes() == inproc[1][name].tobytes(), (transport, name)
