"""`switchyard backward` against PyTorch autograd in float64 on the same Mixtral-style
checkpoint (written by examples/checkpoint/make_checkpoint.py): dx, the gate's gradient and
every expert's, within 1e-5 relative, on in-process ranks 1-4 (EP groups of the world and
of half of it; the forward keeping its rows or the backward recomputing them), and the same
bits under mpirun (MPI), `switchyard launch` (UCX) and with recomputation."""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

TOOL = os.environ["SWITCHYARD_TOOL"]
SOURCE = os.environ["SWITCHYARD_SOURCE_DIR"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")
MAKE_CHECKPOINT = os.path.join(SOURCE, "examples", "checkpoint", "make_checkpoint.py")
E, H, F, T, K = 4, 16, 24, 21, 2
PREFIX = "model.layers.3.block_sparse_moe."


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], np.float32).reshape(info["shape"])
    return out


@pytest.fixture(scope="module")
def case():
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, MAKE_CHECKPOINT, d, "--format", "mixtral", "--experts",
                        str(E), "--hidden", str(H), "--ffn", str(F), "--tokens", str(T),
                        "--top-k", str(K), "--dtype", "f32"], check=True, capture_output=True)
        model = [f for f in os.listdir(d) if f.endswith(".safetensors")][0]
        dy = np.random.default_rng(4).standard_normal((T, H)).astype(np.float32)
        np.save(os.path.join(d, "dy.npy"), dy)
        with open(os.path.join(d, "moe.toml"), "w") as f:
            f.write(f'[model]\nweights = "{model}"\nformat = "mixtral"\nprefix = "{PREFIX}"\n'
                    f'[router]\ntop_k = {K}\npre_softmax = false\n'
                    f'[input]\ntokens = "x.npy"\n[runtime]\ntimeout_s = 60\n')
        yield d


def run_backward(case, out, launcher=(), sets=()):
    command = list(launcher) + [TOOL, "backward", os.path.join(case, "moe.toml"), "--grad-output",
                                os.path.join(case, "dy.npy"), "--out", out]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    experts = read_safetensors(os.path.join(out, "d_experts.safetensors"))
    return (np.load(os.path.join(out, "dx.npy")), np.load(os.path.join(out, "d_gate.npy")),
            experts)


def torch_reference(case):
    """The Mixtral block in float64 with autograd: logits -> top-k -> softmax over the k."""
    w = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in read_safetensors(os.path.join(case, [f for f in os.listdir(case)
                                                           if f.endswith(".safetensors")][0])).items()}
    x = torch.tensor(np.load(os.path.join(case, "x.npy")), dtype=torch.float64, requires_grad=True)
    dy = torch.tensor(np.load(os.path.join(case, "dy.npy")), dtype=torch.float64)
    logits = x @ w[PREFIX + "gate.weight"].T
    top, selected = torch.topk(logits, K, dim=1)
    weights = torch.softmax(top, dim=1)
    y = torch.zeros_like(x)
    for e in range(E):
        w1, w3, w2 = (w[f"{PREFIX}experts.{e}.{n}.weight"] for n in ("w1", "w3", "w2"))
        out = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        weight = (weights * (selected == e)).sum(dim=1, keepdim=True)
        y = y + weight * out
    (y * dy).sum().backward()
    experts = {k: v.grad.numpy() for k, v in w.items() if ".experts." in k}
    return x.grad.numpy(), w[PREFIX + "gate.weight"].grad.numpy(), experts


def relative(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_in_process_ranks_equal_pytorch_autograd(case):
    dx_ref, gate_ref, experts_ref = torch_reference(case)
    with tempfile.TemporaryDirectory() as out:
        # The tool trains: the forward keeps its rows for the backward, unless recompute.
        for world, ep, recompute in ((1, 1, "false"), (2, 2, "false"), (3, 3, "false"),
                                     (4, 4, "false"), (4, 2, "false"), (4, 2, "true"),
                                     (3, 3, "true")):
            got = run_backward(case, os.path.join(out, f"{world}-{ep}-{recompute}"),
                               sets=(f"runtime.ranks={world}", f"runtime.ep_size={ep}",
                                     f"runtime.recompute={recompute}"))
            dx, d_gate, experts = got
            assert relative(dx, dx_ref) <= 1e-5, (world, ep)
            assert relative(d_gate, gate_ref) <= 1e-5, (world, ep)
            assert set(experts) == set(experts_ref)
            for name, g in experts.items():
                assert relative(g, experts_ref[name]) <= 1e-5, (world, ep, name)


@pytest.mark.skipif(not MPIRUN, reason="mpirun and the MPI/UCX transports were not built")
@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2)])
def test_the_same_bits_on_every_transport(case, world, ep):
    with tempfile.TemporaryDirectory() as out:
        group = f"runtime.ep_size={ep}"
        inproc = run_backward(case, os.path.join(out, "inproc"),
                              sets=(f"runtime.ranks={world}", group))
        mpi = run_backward(case, os.path.join(out, "mpi"),
                           launcher=(MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca",
                                     "btl", "self,vader", "-np", str(world)),
                           sets=("runtime.transport=mpi", group))
        ucx = run_backward(case, os.path.join(out, "ucx"),
                           launcher=(TOOL, "launch", "-n", str(world), "--"),
                           sets=("runtime.transport=ucx", group))
        recomputed = run_backward(case, os.path.join(out, "recomputed"),
                                  sets=(f"runtime.ranks={world}", group, "runtime.recompute=true"))
        for other in (mpi, ucx, recomputed):
            assert other[0].tobytes() == inproc[0].tobytes()
            assert other[1].tobytes() == inproc[1].tobytes()
            assert set(other[2]) == set(inproc[2])
            for name in inproc[2]:
                assert other[2][name].tobytes() == inproc[2][name].tobytes(), name
