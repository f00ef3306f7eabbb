"""Training from Python: Runtime.backward against PyTorch float64 autograd on the runtime's
own weights (in training mode, recomputing, and outside training mode; 1-4 in-process
ranks, EP groups of the world and of half of it); Runtime.parameters as writable views an
optimizer updates in place, lowering an imitation loss; save_model writing them back."""
import json
import os
import struct
import tempfile

import numpy as np
import pytest
import torch

import switchyard

E, H, F, T, K = 6, 16, 12, 40, 2
CONFIG = f"""
[runtime]
timeout_s = 60
[router]
top_k = {K}
pre_softmax = false
[model]
num_experts = {E}
hidden = {H}
ffn_hidden = {F}
seed = 3
"""


def torch_layer(gate, experts, x):
    """The Mixtral block: top-k of x·gateᵀ, softmax over the k, SwiGLU experts."""
    logits = x @ gate.T
    top, selected = torch.topk(logits, K, dim=1)
    weights = torch.softmax(top, dim=1)
    y = torch.zeros_like(x)
    for e, (w1, w3, w2) in enumerate(experts):
        out = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        y = y + (weights * (selected == e)).sum(dim=1, keepdim=True) * out
    return y


def relative(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


@pytest.mark.parametrize("ranks,ep,training,recompute", [
    (1, 1, True, False), (2, 2, True, False), (3, 3, False, False), (4, 2, True, False),
    (4, 2, True, True), (4, 4, True, False)])
def test_backward_equals_pytorch_autograd(ranks, ep, training, recompute):
    runtime = switchyard.Runtime.from_string(CONFIG, {
        "runtime.ranks": str(ranks), "runtime.ep_size": str(ep),
        "runtime.recompute": "true" if recompute else "false"})
    runtime.training = training
    assert runtime.training == training
    gate, experts = runtime.parameters()
    assert all(e is not None for e in experts)  # every rank is in this process
    rng = np.random.default_rng(ranks * 10 + ep)
    x = rng.standard_normal((T, H)).astype(np.float32)
    dy = rng.standard_normal((T, H)).astype(np.float32)

    y = runtime.forward(x)
    dx, d_gate, d_experts = runtime.backward(x, dy)

    g = torch.tensor(gate, dtype=torch.float64, requires_grad=True)
    ws = [tuple(torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in e)
          for e in experts]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y_ref = torch_layer(g, ws, xt)
    (y_ref * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    assert relative(y, y_ref.detach().numpy()) <= 1e-5
    assert relative(dx, xt.grad.numpy()) <= 1e-5
    assert relative(d_gate, g.grad.numpy()) <= 1e-5
    for got, want in zip(d_experts, ws):
        for a, b in zip(got, want):
            assert relative(a, b.grad.numpy()) <= 1e-5


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {name: np.frombuffer(data[i["data_offsets"][0]:i["data_offsets"][1]],
                                np.float32).reshape(i["shape"])
            for name, i in header.items() if name != "__metadata__"}


def test_adam_on_the_parameters_lowers_the_loss_and_save_model_keeps_them():
    student = switchyard.Runtime.from_string(CONFIG, {"runtime.ranks": "2",
                                                      "model.ffn_hidden": "24"})
    teacher = switchyard.Runtime.from_string(CONFIG, {"runtime.ranks": "2", "model.seed": "11"})
    student.training = True
    gate, experts = student.parameters()
    tensors = [gate] + [w for e in experts for w in e]
    assert all(t.flags.writeable and t.dtype == np.float32 for t in tensors)
    m = [np.zeros_like(t) for t in tensors]
    v = [np.zeros_like(t) for t in tensors]
    held_out = np.random.default_rng(1).uniform(-1, 1, (256, H)).astype(np.float32)
    target = teacher.forward(held_out)

    def loss():
        student.training = False
        value = float(((student.forward(held_out) - target) ** 2).mean())
        student.training = True
        return value

    first = loss()
    rng = np.random.default_rng(2)
    for step in range(1, 301):
        x = rng.uniform(-1, 1, (128, H)).astype(np.float32)
        y = student.forward(x)
        dy = (2 * (y - teacher.forward(x)) / y.size).astype(np.float32)
        _, d_gate, d_experts = student.backward(x, dy)
        grads = [d_gate] + [g for e in d_experts for g in e]
        for t, g, mt, vt in zip(tensors, grads, m, v):  # Adam, lr 0.01, in place
            mt[:] = 0.9 * mt + 0.1 * g
            vt[:] = 0.999 * vt + 0.001 * g * g
            t -= 0.01 * (mt / (1 - 0.9 ** step)) / (np.sqrt(vt / (1 - 0.999 ** step)) + 1e-8)
    last = loss()
    print(f"imitation loss {first:.3e} -> {last:.3e} ({first / last:.1f}x lower)")
    assert last < first / 3, (first, last)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trained.safetensors")
        student.save_model(path)
        saved = read_safetensors(path)
        assert saved["gate.weight"].tobytes() == gate.tobytes()
        assert saved["experts.4.w2.weight"].tobytes() == experts[4][2].tobytes()
        # The checkpoint loads back and computes what the trained runtime computes.
        again = switchyard.Runtime.from_string(CONFIG, {"runtime.ranks": "2",
                                                        "model.ffn_hidden": "24",
                                                        "model.weights": path})
        student.training = False
        assert again.forward(held_out).tobytes() == student.forward(held_out).tobytes()


def test_bad_backward_calls_raise():
    runtime = switchyard.Runtime.from_string(CONFIG, {"runtime.ranks": "2"})
    x = np.random.default_rng(0).standard_normal((T, H)).astype(np.float32)
    with pytest.raises(switchyard.InvalidArgumentError, match="follows a forward on the same x"):
        runtime.backward(x, x)
    runtime.forward(x)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(switchyard.InvalidArgumentError, match="dy: token .* feature 3 is NaN"):
        runtime.backward(x, bad)
    dx, _, _ = runtime.backward(x, x)  # the runtime still works
    assert np.isfinite(dx).all()
    narrow = switchyard.Runtime.from_string(CONFIG, {"model.dtype": "bf16"})
    with pytest.raises(switchyard.InvalidArgumentError, match="training updates f32 weights"):
        narrow.parameters()
