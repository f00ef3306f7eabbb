"""PyTorch as the real client: switchyard.torch's block (as the example builds it) against
the pure-PyTorch Mixtral block on the same weights (1e-5 relative, f32), its output and, through autograd,
dx and every parameter's gradient; dispatch and combine backward by hand; tensors used in
place through DLPack (pointers checked), and PyTorch's bad input raising ValueError."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import switchyard
import switchyard.torch as st

SOURCE = os.environ["SWITCHYARD_SOURCE_DIR"]
DEMO = os.path.join(SOURCE, "examples", "configs", "demo.toml")
EXAMPLE = os.path.join(SOURCE, "examples", "python", "torch_moe.py")
sys.path.insert(0, os.path.dirname(EXAMPLE))
import torch_moe  # noqa: E402


@pytest.mark.parametrize("ranks, experts, top_k, tokens", [
    (1, 4, 1, 17), (2, 8, 2, 64), (3, 5, 2, 40), (4, 8, 3, 33),
])
def test_switchyard_block_equals_the_pure_pytorch_block(ranks, experts, top_k, tokens):
    torch.manual_seed(ranks * 10 + experts)
    block = torch_moe.MixtralSparseMoeBlock(48, 96, experts, top_k)
    runtime = st.make_runtime(hidden=48, ffn_hidden=96, num_experts=experts, top_k=top_k,
                              ranks=ranks)
    ep_block = torch_moe.switchyard_block(block, runtime)
    x = torch.randn(tokens, 48)
    dy = torch.randn(tokens, 48)
    x_reference = x.clone().requires_grad_()
    expected = block(x_reference)
    (expected * dy).sum().backward()
    reference = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for n, p in block.named_parameters()}
    x_switchyard = x.clone().requires_grad_()
    y, _ = ep_block(x_switchyard)
    (y * dy).sum().backward()

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert y.dtype == torch.float32 and y.shape == x.shape
    assert relative(y.detach(), expected.detach()) <= 1e-5
    assert relative(x_switchyard.grad, x_reference.grad) <= 1e-5
    for name, p in ep_block.named_parameters():
        if reference[name].abs().max() < 1e-6:  # an expert no token chose; top-1's gate
            assert p.grad is None or p.grad.abs().max() < 1e-6, name
            continue
        assert relative(p.grad, reference[name]) <= 1e-5, name
    with torch.no_grad():  # and without autograd
        assert relative(ep_block(x)[0], expected.detach()) <= 1e-5


class Stack(torch.nn.Module):
    """A model of MoE blocks in a residual stream: h = h + block_l(h), layer by layer."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, h):
        for block in self.blocks:
            out = block(h)
            h = h + (out[0] if isinstance(out, tuple) else out)
        return h


@pytest.mark.parametrize("ranks", [1, 3])
def test_four_blocks_sharing_one_runtime_equal_the_pure_pytorch_model(ranks):
    torch.manual_seed(40 + ranks)
    blocks = [torch_moe.MixtralSparseMoeBlock(32, 64, 6, 2) for _ in range(4)]
    runtime = st.make_runtime(hidden=32, ffn_hidden=64, num_experts=6, top_k=2, layers=4,
                              ranks=ranks)
    assert runtime.num_layers == 4
    reference = Stack(blocks)
    model = Stack([torch_moe.switchyard_block(b, runtime, layer=l)
                   for l, b in enumerate(blocks)])
    x, dy = torch.randn(45, 32), torch.randn(45, 32)
    x_reference = x.clone().requires_grad_()
    expected = reference(x_reference)
    (expected * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    reference.zero_grad(set_to_none=True)
    x_switchyard = x.clone().requires_grad_()
    y = model(x_switchyard)
    (y * dy).sum().backward()

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert relative(y.detach(), expected.detach()) <= 1e-5
    assert relative(x_switchyard.grad, x_reference.grad) <= 1e-5
    for name, p in model.named_parameters():
        if name not in grads or grads[name].abs().max() < 1e-6:
            assert p.grad is None or p.grad.abs().max() < 1e-6, name
            continue
        assert relative(p.grad, grads[name]) <= 1e-5, name
    # Every block dispatched through its own layer of the runtime.
    if ranks > 1:
        sent = [runtime.stats(layer=layer)["dispatch_bytes"] for layer in range(4)]
        assert all(b > 0 for b in sent) and len(set(sent)) > 1, sent
    with pytest.raises(ValueError, match="the runtime has 4 MoE layers"):
        torch_moe.switchyard_block(blocks[0], runtime, layer=4)


def test_the_example_runs_and_agrees():
    done = subprocess.run([sys.executable, EXAMPLE, "--ranks", "3", "--tokens", "50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every parameter's gradient" in done.stdout


def test_dispatch_and_combine_backward_by_hand():
    # Identity experts (each part's output is its input): combine gives sum_k w x, so
    # d weight[t,k] = <dy[t], x[t]> for kept slots, each row's output gradient is its
    # weight times its token's dy, and dispatch_backward of ones counts each token's copies.
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = np.random.default_rng(1).standard_normal((9, rt.hidden)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((9, rt.hidden)).astype(np.float32)
    experts, weights = rt.route(x)
    experts[::3, 1] = -1
    weights[::3, 1] = 0
    dispatched = rt.dispatch(x, (experts, weights))
    outputs = [np.ascontiguousarray(p["expert_input"]) for p in dispatched.parts]
    rt.combine(dispatched, outputs)
    d_outputs, d_weights = rt.combine_backward(dispatched, dy, outputs)
    expected = np.where(experts >= 0, (dy.astype(np.float64) * x).sum(1)[:, None], 0)
    assert np.abs(d_weights - expected).max() <= 1e-5 * np.abs(expected).max()
    # Each grouped row is x of some token t sent to expert e: its gradient is w[t,e]·dy[t].
    for part, grad, rows in zip(dispatched.parts, d_outputs, outputs):
        first = 0
        for e, n in zip(part["experts"], part["rows_per_expert"]):
            for row, g in zip(rows[first:first + n], grad[first:first + n]):
                t = int(np.argmin(np.abs(x - row).sum(1)))
                k = int(np.flatnonzero(experts[t] == e)[0])
                assert np.allclose(g, weights[t, k] * dy[t], rtol=1e-6, atol=1e-7)
            first += n
    # The backward of dispatch sums a token's rows' gradients: ones give its kept slots.
    ones = [np.ones_like(p["expert_input"]) for p in dispatched.parts]
    dx = rt.dispatch_backward(dispatched, ones)
    assert np.array_equal(dx, np.repeat((experts >= 0).sum(1)[:, None], rt.hidden, 1)
                          .astype(np.float32))
    with pytest.raises(ValueError, match="dy: token 4 feature 0 is NaN"):
        bad = dy.copy()
        bad[4, 0] = np.nan
        rt.combine_backward(dispatched, bad, outputs)


def test_tensors_are_used_in_place():
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = torch.randn(12, rt.hidden)
    y = torch.full((12, rt.hidden), float("nan"))
    pointer = y.data_ptr()
    assert switchyard._switchyard._data_pointer(x) == x.data_ptr()
    assert rt.forward(x, out=y) is y
    assert y.data_ptr() == pointer
    assert y.numpy().tobytes() == rt.forward(x.numpy()).tobytes()
    # Dispatch from PyTorch, with topk's int64 ids; the received rows viewed without copies.
    experts, weights = switchyard.route(torch.randn(12, rt.num_experts), top_k=2)
    dispatched = rt.dispatch(x, (torch.from_numpy(experts).long(), torch.from_numpy(weights)))
    for part in dispatched.parts:
        rows = torch.from_numpy(part["expert_input"])
        assert rows.data_ptr() == part["expert_input"].ctypes.data
        torch.from_numpy(part["expert_output"]).copy_(rows)  # identity experts
    out = torch.empty_like(x)
    rt.combine(dispatched, out=out)
    expected = x.double() * torch.from_numpy(weights).double().sum(1, keepdim=True)
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("bad, message", [
    (lambda h: torch.randn(4, h, dtype=torch.float64), "expected f32[*,64] contiguous host tensor, got f64[4,64]"),
    (lambda h: torch.randn(h, 4).t(), "not contiguous"),
    (lambda h: torch.randn(4, h + 2), "input x: expected f32[*,64]"),
    (lambda h: torch.full((4, h), float("nan")), "is NaN"),
    (lambda h: torch.randn(4, h, requires_grad=True), "Can't export tensors that require gradient"),
])
def test_bad_pytorch_input_raises_value_error(bad, message):
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    with pytest.raises(ValueError) as caught:
        rt.forward(bad(rt.hidden))
    assert message in str(caught.value)
    assert isinstance(caught.value, switchyard.InvalidArgumentError)
    assert rt.forward(np.ones((3, rt.hidden), np.float32)).shape == (3, rt.hidden)
