"""PyTorch MoE blocks over a Switchyard runtime: `switchyard.torch`.

    import torch, switchyard, switchyard.torch as st
    runtime = st.make_runtime(hidden=64, ffn_hidden=128, num_experts=8, top_k=2, layers=4,
                              ranks=2)
    blocks = [st.MoeBlock(runtime, top_k=2, ffn_hidden=128, layer=l) for l in range(4)]
    y, router_logits = blocks[0](torch.randn(3, 5, 64))

`MoeBlock` replaces a Hugging Face sparse MoE block: the same `state_dict` names
(`layout="mixtral"`: `gate.weight`, `experts.{e}.w1/w2/w3.weight`; `layout="qwen"`:
`gate.weight`, `experts.{e}.gate_proj/up_proj/down_proj.weight`, and with
`shared_expert_ffn_hidden` Qwen2-MoE's `shared_expert.*` and `shared_expert_gate.weight`),
the same call (`hidden_states` [..., H] in, `(y, router_logits)` out) and the same
arithmetic, so `block.load_state_dict(hf_block.state_dict())` swaps one for the other.

Per forward, PyTorch computes the router logits with the block's gate; Switchyard's top-k
router selects each token's experts from them (ties to the lower expert); the routing
weights are PyTorch's own softmax of the logits at the selected experts (renormalised
when `norm_topk_prob`), so the gate gets its gradient through autograd. `Runtime.dispatch`
sends each token's row to the ranks of its experts, this process runs the experts of the
ranks it hosts on the rows they received (views of Switchyard's buffers, no copies), and
`Runtime.combine` weighs, returns and sums their results. Dispatch and combine are
`torch.autograd.Function`s whose backwards are Switchyard's (`dispatch_backward`,
`combine_backward`), so `loss.backward()` reaches x, the gate and every expert.

Several blocks share one runtime, each its own layer of it (`[model] layers`), and with it
its transports and step buffers. Gradients: the gate's cover this process's tokens (reduce
them over the data-parallel ranks as any replicated weight's); an expert's cover the tokens
of its EP group that chose it, on the process that hosts it (sum them over its DP group:
`expert_parameters` lists them). f32 tokens on the host (CPU tensors).
"""
from __future__ import annotations

import types
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Router, Runtime

#: The state_dict names of an expert's gate, up and down projections per layout.
EXPERT_NAMES: Dict[str, Tuple[str, str, str]] = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen": ("gate_proj", "up_proj", "down_proj"),
}


def _check_layout(layout: str) -> Tuple[str, str, str]:
    if layout not in EXPERT_NAMES:
        raise ValueError(f"layout {layout!r}: expected one of {sorted(EXPERT_NAMES)}")
    return EXPERT_NAMES[layout]


class SwiGLUExpert(nn.Module):
    """down(silu(gate(x)) * up(x)), without biases, under a layout's names (Mixtral: w1
    gate, w3 up, w2 down; Qwen-MoE: gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden: int, ffn_hidden: int, layout: str = "mixtral") -> None:
        super().__init__()
        self._names = _check_layout(layout)
        gate, up, down = self._names
        setattr(self, gate, nn.Linear(hidden, ffn_hidden, bias=False))
        setattr(self, up, nn.Linear(hidden, ffn_hidden, bias=False))
        setattr(self, down, nn.Linear(ffn_hidden, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self._names)
        return down(F.silu(gate(x)) * up(x))


class _Dispatch(torch.autograd.Function):
    """x -> the rows each local rank received (one tensor per part, views of Switchyard's
    buffers). Backward: per token, the sum of its rows' gradients (dispatch_backward)."""

    @staticmethod
    def forward(ctx, x, state, experts, weights):  # type: ignore[override]
        state.dispatched = state.runtime.dispatch(x.detach(), (experts, weights.detach()),
                                                  layer=state.layer)
        ctx.state = state
        return tuple(torch.from_numpy(p["expert_input"]) for p in state.dispatched.parts)

    @staticmethod
    def backward(ctx, *grad_rows):  # type: ignore[override]
        parts = ctx.state.dispatched.parts
        grads = [torch.zeros(p["expert_input"].shape) if g is None else g.contiguous()
                 for g, p in zip(grad_rows, parts)]
        dx = ctx.state.runtime.dispatch_backward(ctx.state.dispatched, grads)
        return torch.from_numpy(dx), None, None, None


class _Combine(torch.autograd.Function):
    """The experts' outputs and the routing weights -> y (combine). Backward: each output's
    gradient is its slot's weight times dy, each weight's <dy, its expert's output>
    (combine_backward)."""

    @staticmethod
    def forward(ctx, weights, state, *outputs):  # type: ignore[override]
        tensors = [o.detach().contiguous() for o in outputs]
        y = torch.empty(state.dispatched.num_tokens, state.runtime.hidden)
        state.runtime.combine(state.dispatched, tensors, out=y)
        ctx.state, ctx.tensors = state, tensors
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        d_outputs, d_weights = ctx.state.runtime.combine_backward(
            ctx.state.dispatched, dy.contiguous(), ctx.tensors)
        return (torch.from_numpy(d_weights), None, *(torch.from_numpy(d) for d in d_outputs))


class _RuntimeLayer(torch.autograd.Function):
    """x -> y through the runtime's own router and experts (`kernel="switchyard"`); the
    block's gate and local experts' parameters are inputs so that autograd gives them the
    gradients of `Runtime.backward`."""

    @staticmethod
    def forward(ctx, x, block, *parameters):  # type: ignore[override]
        x = x.detach().contiguous()
        y = torch.empty_like(x)
        block.runtime.forward(x, out=y, layer=block.layer)
        ctx.block, ctx.x, ctx.count = block, x, len(parameters)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        block = ctx.block
        dx, d_gate, d_experts = block.runtime.backward(ctx.x, dy.contiguous(), layer=block.layer)
        grads = [torch.from_numpy(d_gate)]
        for e in block._runtime_experts:
            gate, up, down = d_experts[e]
            grads += [torch.from_numpy(gate), torch.from_numpy(up), torch.from_numpy(down)]
        return (torch.from_numpy(dx), None, *grads)


class MoeBlock(nn.Module):
    """A sparse MoE block whose routing, dispatch and combine run through layer `layer` of
    `runtime` (a `switchyard.Runtime` whose `[model]` has the block's hidden size and
    expert count), with Hugging Face's `state_dict` names and call (see the module).

    `experts`: the block's experts (PyTorch modules, each [n,H] -> [n,H]); by default new
    `SwiGLUExpert`s of `ffn_hidden` under the layout's names. `norm_topk_prob`: renormalise
    the selected experts' probabilities to sum to 1 (Mixtral always; Qwen3-MoE does, Qwen2-
    MoE does not; default: True). `shared_expert_ffn_hidden` > 0 (layout "qwen"): Qwen2-MoE's
    shared expert, added to every token as sigmoid(shared_expert_gate(x)) · shared_expert(x).

    `kernel="switchyard"`: the runtime's own router and expert kernel compute the layer
    (`Runtime.forward` and `Runtime.backward`); the gate's and this process's experts'
    parameters are views of the runtime's weights (loading a state_dict or an optimizer
    step changes them in place), and their gradients come summed as `Runtime.backward` sums
    them (the gate's over the world, an expert's over its DP group: do not reduce them
    again). Its routing is the runtime's `[router]` section, which must say what the
    layout's block computes (Mixtral: `normalize = true`). Experts of other processes
    are plain parameters, unused here.
    """

    def __init__(self, runtime: Runtime, top_k: int, *, ffn_hidden: int = 0, layer: int = 0,
                 layout: str = "mixtral", norm_topk_prob: Optional[bool] = None,
                 shared_expert_ffn_hidden: int = 0,
                 experts: Optional[Sequence[nn.Module]] = None, kernel: str = "torch") -> None:
        super().__init__()
        _check_layout(layout)
        if kernel not in ("torch", "switchyard"):
            raise ValueError(f"kernel {kernel!r}: expected 'torch' or 'switchyard'")
        if kernel == "switchyard" and (experts is not None or shared_expert_ffn_hidden):
            raise ValueError("kernel='switchyard' computes the runtime's own experts: give no "
                             "experts and no shared expert")
        if not 0 <= layer < runtime.num_layers:
            raise ValueError(f"layer {layer}: the runtime has {runtime.num_layers} MoE layers "
                             f"(indices 0..{runtime.num_layers - 1})")
        hidden, num_experts = runtime.hidden, runtime.num_experts
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k}: expected 1..{num_experts} (the runtime's experts)")
        if layout == "mixtral" and norm_topk_prob is False:
            raise ValueError("norm_topk_prob: Mixtral always renormalises the top-k weights")
        if shared_expert_ffn_hidden and layout != "qwen":
            raise ValueError("a shared expert is Qwen2-MoE's: use layout='qwen'")
        if experts is None:
            if ffn_hidden <= 0:
                raise ValueError("ffn_hidden: give the experts' hidden size, or the experts")
            experts = [SwiGLUExpert(hidden, ffn_hidden, layout) for _ in range(num_experts)]
        if len(experts) != num_experts:
            raise ValueError(f"{len(experts)} experts given, the runtime has {num_experts}")
        self.runtime = runtime
        self.layer = layer
        self.layout = layout
        self.top_k = top_k
        self.num_experts = num_experts
        self.norm_topk_prob = True if norm_topk_prob is None else norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        if shared_expert_ffn_hidden:
            self.shared_expert = SwiGLUExpert(hidden, shared_expert_ffn_hidden, "qwen")
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # Selection only: the top-k of the logits (those of softmax(logits) too).
        self._router = Router("topk", num_experts=num_experts, top_k=top_k)
        self.kernel = kernel
        self._runtime_experts: List[int] = []
        if kernel == "switchyard":
            self._share_runtime_weights()

    def _share_runtime_weights(self) -> None:
        """The gate and this process's experts as views of the runtime's weights."""
        gate, experts = self.runtime.parameters(layer=self.layer)
        self.gate.weight = nn.Parameter(torch.from_numpy(gate))
        names = EXPERT_NAMES[self.layout]
        for e, weights in enumerate(experts):
            if weights is None:
                continue
            for name, view in zip(names, weights):  # (gate, up, down) as the runtime has them
                getattr(self.experts[e], name).weight = nn.Parameter(torch.from_numpy(view))
            self._runtime_experts.append(e)

    def _runtime_parameters(self) -> List[nn.Parameter]:
        parameters = [self.gate.weight]
        for e in self._runtime_experts:
            parameters += [getattr(self.experts[e], name).weight
                           for name in EXPERT_NAMES[self.layout]]
        return parameters

    def local_experts(self) -> List[int]:
        """The experts this process computes: those of the ranks it hosts."""
        return list(self.runtime.local_experts)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of `local_experts`: the ones whose gradients the DP group sums."""
        for e in self.local_experts():
            yield from self.experts[e].parameters()

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(y, router_logits) for `hidden_states` [..., H]: y of the same shape, the logits
        [tokens, E], as Hugging Face's blocks return them."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        logits = self.gate(x)
        if self.kernel == "switchyard":
            # The runtime keeps what its backward needs when gradients are wanted.
            training = torch.is_grad_enabled() and self.training
            if self.runtime.training != training:
                self.runtime.training = training
            y = _RuntimeLayer.apply(x, self, *self._runtime_parameters())
            return y.reshape(shape), logits
        selected, _ = self._router.route(logits.detach().float().contiguous())
        selected = torch.from_numpy(selected).long()
        probabilities = F.softmax(logits, dim=-1, dtype=torch.float)
        weights = probabilities.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        state = types.SimpleNamespace(runtime=self.runtime, layer=self.layer)
        rows = _Dispatch.apply(x, state, selected.int(), weights)
        outputs = []
        for part, part_rows in zip(state.dispatched.parts, rows):
            # Each expert on its block of rows; the blocks may be padded ([runtime]
            # expert_alignment), and the padding's outputs are zero rows no slot reads.
            pieces, end = [], 0
            for e, count, first in zip(part["experts"], part["rows_per_expert"],
                                       part["expert_first_row"]):
                if first > end:
                    pieces.append(part_rows.new_zeros(first - end, part_rows.shape[1]))
                if count:
                    pieces.append(self.experts[e](part_rows[first:first + count]))
                end = first + count
            if part_rows.shape[0] > end:
                pieces.append(part_rows.new_zeros(part_rows.shape[0] - end, part_rows.shape[1]))
            # A part that received nothing still takes part in the combine.
            outputs.append(torch.cat(pieces) if pieces else part_rows * 0)
        y = _Combine.apply(weights, state, *outputs)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape), logits


def make_runtime(*, hidden: int, ffn_hidden: int, num_experts: int, top_k: int,
                 layers: int = 1, ranks: Optional[int] = None, transport: str = "inproc",
                 ep_size: Optional[int] = None, normalize: bool = False,
                 **overrides: str) -> Runtime:
    """A runtime for `layers` MoE blocks of this shape (its own router and expert weights
    serve blocks with kernel="switchyard"; the others route and compute in PyTorch).
    `ranks`: in-process ranks (inproc); with a launcher (mpirun, `switchyard launch`) leave
    it out and name the transport. `normalize`: the router renormalises its top-k weights
    (Mixtral, Qwen3-MoE). `overrides`: more "section.key" settings."""
    config = (f'[runtime]\ntransport = "{transport}"\n'
              f"[model]\nhidden = {hidden}\nffn_hidden = {ffn_hidden}\n"
              f"num_experts = {num_experts}\n"
              f'layers = "{"" if layers == 1 else f"0-{layers - 1}"}"\n'
              f"[router]\ntop_k = {top_k}\nnormalize = {'true' if normalize else 'false'}\n")
    settings = dict(overrides)
    if ranks is not None:
        settings["runtime.ranks"] = str(ranks)
    if ep_size is not None:
        settings["runtime.ep_size"] = str(ep_size)
    return Runtime.from_string(config, settings)
