"""PyTorch as the real client: the example's Switchyard block against the pure-PyTorch
Mixtral block on the same weights (1e-5 relative, f32), tensors used in place through
DLPack (pointers checked), and PyTorch's bad input raising ValueError with its reason."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import switchyard

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
    runtime = torch_moe.runtime_for(block, 48, 96, ranks, "inproc")
    ep_block = torch_moe.SwitchyardMoeBlock(block, runtime)
    x = torch.randn(tokens, 48)
    with torch.no_grad():
        expected = block(x)
        y = ep_block(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_the_example_runs_and_agrees():
    done = subprocess.run([sys.executable, EXAMPLE, "--ranks", "3", "--tokens", "50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max relative difference to the pure-PyTorch block" in done.stdout


def test_the_block_is_inference_only():
    block = torch_moe.MixtralSparseMoeBlock(64, 32, 4, 2)
    ep_block = torch_moe.SwitchyardMoeBlock(block, torch_moe.runtime_for(block, 64, 32, 2,
                                                                         "inproc"))
    with pytest.raises(NotImplementedError, match="inference only"):
        ep_block(torch.randn(4, 64))


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
