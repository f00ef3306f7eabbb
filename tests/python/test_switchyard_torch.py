"""switchyard.torch against Hugging Face's sparse MoE blocks written out in pure PyTorch here
(Mixtral; Qwen2-MoE with its shared expert and without renormalisation; Qwen3-MoE): the
same state_dict loads into either, and outputs and gradients (x, the gate, every expert,
the shared expert) agree within 1e-5 (f32) on 1-3 in-process ranks; blocks of a model share
one runtime; bad arguments are refused by name."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import switchyard
import switchyard.torch as st


class HFExpert(nn.Module):
    """A SwiGLU MLP under the names Hugging Face uses (Mixtral's w1/w3/w2, Qwen's
    gate_proj/up_proj/down_proj)."""

    def __init__(self, hidden, ffn, names):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, ffn, bias=False))
        setattr(self, up, nn.Linear(hidden, ffn, bias=False))
        setattr(self, down, nn.Linear(ffn, hidden, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class HFSparseMoeBlock(nn.Module):
    """The forward of transformers' MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock /
    Qwen3MoeSparseMoeBlock (no jitter), written out: softmax over all experts, top-k,
    renormalised when norm_topk_prob, each expert over its tokens, index_add; Qwen2-MoE's
    shared expert behind a sigmoid gate."""

    def __init__(self, hidden, ffn, experts, top_k, names, norm_topk_prob, shared_ffn=0):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(HFExpert(hidden, ffn, names) for _ in range(experts))
        if shared_ffn:
            self.shared_expert = HFExpert(hidden, shared_ffn, ("gate_proj", "up_proj", "down_proj"))
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, hidden_states):
        batch, length, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(batch, length, hidden), router_logits


VARIANTS = {
    "mixtral": dict(layout="mixtral", names=("w1", "w3", "w2"), norm=True, shared=0),
    "qwen2_moe": dict(layout="qwen", names=("gate_proj", "up_proj", "down_proj"), norm=False,
                      shared=40),
    "qwen3_moe": dict(layout="qwen", names=("gate_proj", "up_proj", "down_proj"), norm=True,
                      shared=0),
}
H, FFN, E = 32, 48, 6


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def pair(variant, ranks, top_k, seed, layers=1, layer=0, runtime=None, kernel="torch"):
    v = VARIANTS[variant]
    torch.manual_seed(seed)
    shared = v["shared"] if kernel == "torch" else 0
    reference = HFSparseMoeBlock(H, FFN, E, top_k, v["names"], v["norm"], shared)
    runtime = runtime or st.make_runtime(hidden=H, ffn_hidden=FFN, num_experts=E, top_k=top_k,
                                         layers=layers, ranks=ranks, normalize=v["norm"])
    block = st.MoeBlock(runtime, top_k, ffn_hidden=FFN, layer=layer, layout=v["layout"],
                        norm_topk_prob=v["norm"], shared_expert_ffn_hidden=shared, kernel=kernel)
    block.load_state_dict(reference.state_dict())  # strict: every name the same
    assert sorted(block.state_dict()) == sorted(reference.state_dict())
    return reference, block, runtime


@pytest.mark.parametrize("kernel", ["torch", "switchyard"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("ranks, top_k", [(1, 1), (2, 2), (3, 2)])
def test_block_equals_the_hugging_face_block(variant, ranks, top_k, kernel):
    # kernel="switchyard": the runtime's router and expert kernel (Qwen2-MoE without its
    # shared expert there); "torch": PyTorch's.
    reference, block, _ = pair(variant, ranks, top_k, seed=ranks * 7 + top_k, kernel=kernel)
    x = torch.randn(3, 13, H)
    dy = torch.randn(3, 13, H)
    x_reference, x_block = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, expected_logits = reference(x_reference)
    (expected * dy).sum().backward()
    y, logits = block(x_block)
    (y * dy).sum().backward()
    assert y.shape == x.shape and logits.shape == (39, E)
    assert relative(y.detach(), expected.detach()) <= 1e-5
    assert relative(logits.detach(), expected_logits.detach()) <= 1e-6
    assert relative(x_block.grad, x_reference.grad) <= 1e-5
    ours = dict(block.named_parameters())
    for name, p in reference.named_parameters():
        # An expert no token chose; top-1's renormalised gate (its weights are 1: its
        # gradient is round-off).
        if p.grad is None or p.grad.abs().max() < 1e-6:
            assert ours[name].grad is None or ours[name].grad.abs().max() < 1e-6, name
            continue
        assert relative(ours[name].grad, p.grad) <= 1e-5, name


def test_blocks_of_a_model_share_one_runtime():
    # Four Mixtral blocks in a residual stream over one runtime of four layers, each block
    # its own layer: the same outputs and gradients as the pure-PyTorch model.
    runtime = st.make_runtime(hidden=H, ffn_hidden=FFN, num_experts=E, top_k=2, layers=4,
                              ranks=2)
    pairs = [pair("mixtral", 2, 2, seed=40 + l, layer=l, runtime=runtime)[:2] for l in range(4)]
    x = torch.randn(2, 9, H)
    dy = torch.randn(2, 9, H)

    def run(blocks, x):
        h = x
        for b in blocks:
            h = h + b(h)[0]
        return h

    x_reference, x_model = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = run([r for r, _ in pairs], x_reference)
    (expected * dy).sum().backward()
    y = run([b for _, b in pairs], x_model)
    (y * dy).sum().backward()
    assert relative(y.detach(), expected.detach()) <= 1e-5
    assert relative(x_model.grad, x_reference.grad) <= 1e-5
    for reference, block in pairs:
        assert relative(block.gate.weight.grad, reference.gate.weight.grad) <= 1e-5
    # Each block moved its rows through its own layer.
    assert all(runtime.stats(layer=l)["dispatch_bytes"] > 0 for l in range(4))


def test_the_switchyard_kernel_blocks_weights_are_the_runtimes():
    reference, block, runtime = pair("mixtral", 2, 2, seed=5, kernel="switchyard")
    gate, experts = runtime.parameters()
    # Loading the state_dict wrote the runtime's own weights, which the block views.
    assert block.gate.weight.data_ptr() == gate.ctypes.data
    assert np.array_equal(gate, reference.gate.weight.detach().numpy())
    assert np.array_equal(experts[3][2], reference.experts[3].w2.weight.detach().numpy())
    with torch.no_grad():  # an optimizer's in-place step reaches the runtime too
        block.experts[3].w2.weight.mul_(2)
    assert np.array_equal(experts[3][2], 2 * reference.experts[3].w2.weight.detach().numpy())


def test_padded_expert_blocks_give_the_same_block():
    # [runtime] expert_alignment pads each expert's rows (grouped GEMMs): the same outputs.
    reference, block, _ = pair("mixtral", 2, 2, seed=9)
    padded_runtime = st.make_runtime(hidden=H, ffn_hidden=FFN, num_experts=E, top_k=2, ranks=2,
                                     **{"runtime.expert_alignment": "8"})
    padded = st.MoeBlock(padded_runtime, 2, ffn_hidden=FFN)
    padded.load_state_dict(reference.state_dict())
    x = torch.randn(19, H)
    dispatched = padded_runtime.dispatch(x, switchyard.route(torch.randn(19, E), top_k=2))
    assert all(first % 8 == 0 for part in dispatched.parts for first in part["expert_first_row"])
    with torch.no_grad():
        assert relative(padded(x)[0], reference(x.view(1, 19, H))[0].view(19, H)) <= 1e-5
        assert torch.equal(padded(x)[0], block(x)[0])


def test_local_experts_and_their_parameters():
    runtime = st.make_runtime(hidden=H, ffn_hidden=FFN, num_experts=E, top_k=2, ranks=3)
    block = st.MoeBlock(runtime, 2, ffn_hidden=FFN)
    assert block.local_experts() == list(range(E))  # every rank is in this process
    assert len(list(block.expert_parameters())) == 3 * E
    with torch.no_grad():  # and without autograd
        y, _ = block(torch.randn(5, H))
        assert y.shape == (5, H) and torch.isfinite(y).all()


def test_bad_arguments_are_refused_by_name():
    runtime = st.make_runtime(hidden=H, ffn_hidden=FFN, num_experts=E, top_k=2, ranks=1)
    with pytest.raises(ValueError, match="layout 'gpt'"):
        st.MoeBlock(runtime, 2, ffn_hidden=FFN, layout="gpt")
    with pytest.raises(ValueError, match="top_k 7: expected 1..6"):
        st.MoeBlock(runtime, 7, ffn_hidden=FFN)
    with pytest.raises(ValueError, match="layer 1: the runtime has 1 MoE layers"):
        st.MoeBlock(runtime, 2, ffn_hidden=FFN, layer=1)
    with pytest.raises(ValueError, match="3 experts given, the runtime has 6"):
        st.MoeBlock(runtime, 2, experts=[st.SwiGLUExpert(H, FFN) for _ in range(3)])
    with pytest.raises(ValueError, match="Mixtral always renormalises"):
        st.MoeBlock(runtime, 2, ffn_hidden=FFN, norm_topk_prob=False)
    with pytest.raises(ValueError, match="shared expert is Qwen2-MoE's"):
        st.MoeBlock(runtime, 2, ffn_hidden=FFN, shared_expert_ffn_hidden=8)
    block = st.MoeBlock(runtime, 2, ffn_hidden=FFN)
    with pytest.raises(switchyard.Error):
        block(torch.full((4, H), float("nan")))
