"""The Python module against what it must do: the layer equals its dense reference and is
bit-identical to `switchyard run` on the same config and tokens; tensors are used in place
(NumPy and DLPack objects, `out=`; the pointer and the allocations are checked); dispatch
and combine with the test's own experts against NumPy in float64; the router alone against
NumPy; every error raises the matching exception class with the C++ message; two processes
under mpirun and `switchyard launch`. Run by CTest with PYTHONPATH=build/python and Debian's
python3 (tests/python/test_torch.py has the PyTorch ones)."""
import os
import subprocess
import sys
import tempfile
import tracemalloc

import numpy as np
import pytest

import switchyard

TOOL = os.environ["SWITCHYARD_TOOL"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")
SOURCE = os.environ["SWITCHYARD_SOURCE_DIR"]
DEMO = os.path.join(SOURCE, "examples", "configs", "demo.toml")


def tokens(rows, hidden, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, hidden)).astype(np.float32)


def test_version_is_the_tools():
    out = subprocess.run([TOOL, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == switchyard.__version__


@pytest.mark.parametrize("ranks", ["1", "2", "3"])
def test_forward_equals_the_dense_reference(ranks):
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": ranks})
    assert rt.world_size == int(ranks)
    x = tokens(29, rt.hidden)
    y = rt.forward(x)
    reference = rt.reference_forward(x)
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()
    stats = rt.stats()
    assert stats["tokens"] == 29
    assert sum(stats["counts"]) == 29 * 2  # top-2, nothing dropped
    assert set(stats["timings"]) == {"route_s", "layout_s", "dispatch_s", "experts_s", "combine_s"}


def test_bit_identical_to_switchyard_run():
    with tempfile.TemporaryDirectory() as d:
        x = tokens(40, 64, seed=3)
        np.save(os.path.join(d, "x.npy"), x)
        subprocess.run([TOOL, "run", DEMO, "--set", "input.tokens=" + os.path.join(d, "x.npy"),
                        "--set", "output.path=" + os.path.join(d, "y.npy")],
                       check=True, capture_output=True)
        expected = np.load(os.path.join(d, "y.npy"))
    rt = switchyard.Runtime(DEMO)
    assert rt.forward(x).tobytes() == expected.tobytes()


def test_tensors_are_used_in_place():
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = tokens(8, rt.hidden)
    out = np.full((8, rt.hidden), np.nan, np.float32)
    assert rt.forward(x, out=out) is out
    assert not np.isnan(out).any()

    class OnlyDlpack:  # a foreign tensor type: reached through __dlpack__ alone
        def __init__(self, array):
            self.array = array
            self.calls = 0

        def __dlpack__(self, stream=None):
            self.calls += 1
            return self.array.__dlpack__()

    source = OnlyDlpack(x)
    target = OnlyDlpack(np.zeros_like(x))
    rt.forward(source, out=target)
    assert source.calls == 1 and target.calls == 1
    assert target.array.tobytes() == out.tobytes()  # written in place, through DLPack


def test_route_alone():
    rt = switchyard.Runtime(DEMO)
    experts, weights = rt.route(tokens(10, rt.hidden))
    assert experts.shape == (10, 2) and experts.dtype == np.int32
    assert weights.shape == (10, 2) and weights.dtype == np.float32
    assert ((experts >= 0) & (experts < rt.num_experts)).all()
    assert (experts[:, 0] != experts[:, 1]).all()
    assert (weights[:, 0] >= weights[:, 1]).all()


@pytest.mark.parametrize("bad, message", [
    (lambda h: tokens(4, h).astype(np.float64), "input x: dtype float64 is not supported"),
    (lambda h: np.ones((4, 2 * h), np.float32)[:, ::2], "not contiguous"),
    (lambda h: tokens(4, h + 1), "input x: expected f32[*,64]"),
    (lambda h: np.full((4, h), np.nan, np.float32), "is NaN"),
    (lambda h: "not a tensor", "expected a NumPy array or an object with __dlpack__"),
])
def test_bad_input_raises_value_error_naming_it(bad, message):
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    with pytest.raises(ValueError, match=None) as caught:
        rt.forward(bad(rt.hidden))
    assert isinstance(caught.value, switchyard.InvalidArgumentError)
    assert isinstance(caught.value, switchyard.Error)
    assert caught.value.code == "invalid argument"
    assert message in str(caught.value)
    rt.forward(tokens(4, rt.hidden))  # and the runtime still works


def test_configuration_errors_carry_the_tools_messages():
    with pytest.raises(FileNotFoundError) as missing:
        switchyard.Runtime("/nonexistent/moe.toml")
    assert isinstance(missing.value, switchyard.NotFoundError)
    assert str(missing.value) == "config file /nonexistent/moe.toml does not exist"
    with pytest.raises(ValueError) as typo:
        switchyard.Runtime(DEMO, overrides={"router.topk": "2"})
    assert "did you mean 'top_k'" in str(typo.value)
    plugins = {(p["kind"], p["name"]) for p in switchyard.Runtime(DEMO).plugins()}
    if ("transport", "mpi") in plugins:
        with pytest.raises(switchyard.UnavailableError) as launcher:
            switchyard.Runtime.from_string('[runtime]\ntransport = "mpi"\n')
        assert "mpirun" in str(launcher.value)
    else:  # a build without MPI: the plugin is missing, and the error says so
        with pytest.raises(switchyard.NotFoundError) as missing_plugin:
            switchyard.Runtime.from_string('[runtime]\ntransport = "mpi"\n')
        assert "mpi" in str(missing_plugin.value)


def test_plugins_are_listed():
    names = {(p["kind"], p["name"]) for p in switchyard.Runtime(DEMO).plugins()}
    assert ("transport", "inproc") in names and ("router", "topk") in names


def test_no_copy_of_the_tokens_at_the_boundary():
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = tokens(2048, rt.hidden)  # 512 KiB
    out = np.empty_like(x)
    # The address the runtime reads is the array's own.
    assert switchyard._switchyard._data_pointer(x) == x.ctypes.data
    assert switchyard._switchyard._data_pointer(out) == out.ctypes.data
    rt.forward(x, out=out)  # the layer's own buffers are now grown
    # NumPy reports its allocations to tracemalloc: a copy of x or y would be 512 KiB.
    tracemalloc.start()
    try:
        rt.forward(x, out=out)
        dispatched = rt.dispatch(x, rt.route(x))
        rt.combine(dispatched, out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, f"{peak} bytes allocated at the boundary"


def hand_expert(e, v):
    """The test's own experts: f_e(v) = (e + 1) v + e."""
    return (e + 1) * v + e


def run_hand_experts(dispatched):
    for part in dispatched.parts:
        first = 0
        for e, n in zip(part["experts"], part["rows_per_expert"]):
            rows = part["expert_input"][first:first + n].astype(np.float64)
            part["expert_output"][first:first + n] = hand_expert(e, rows)
            first += n
        assert first == part["expert_input"].shape[0]


def expected_combine(x, experts, weights):
    """sum_k w[t,k] f_{e_k}(x[t]) in float64."""
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t]):
            if e >= 0:
                y[t] += np.float64(w) * hand_expert(int(e), x[t].astype(np.float64))
    return y


@pytest.mark.parametrize("ranks", ["1", "3"])
def test_dispatch_and_combine_with_own_experts(ranks):
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": ranks})
    x = tokens(23, rt.hidden, seed=5)
    experts, weights = rt.route(x)
    experts[::4, 1] = -1  # unused slots
    weights[::4, 1] = 0
    dispatched = rt.dispatch(x, (experts, weights))
    assert dispatched.num_tokens == 23
    parts = dispatched.parts
    assert [p["world_rank"] for p in parts] == list(range(int(ranks)))
    assert sum((p["experts"] for p in parts), []) == list(range(rt.num_experts))
    # Rows per expert: the tokens routed to it, counted here.
    for p in parts:
        for e, n in zip(p["experts"], p["rows_per_expert"]):
            assert n == int((experts == e).sum())
    run_hand_experts(dispatched)
    y = rt.combine(dispatched)
    expected = expected_combine(x, experts, weights)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    # Expert outputs of the caller's own, one per part; and once per dispatch.
    with pytest.raises(ValueError, match="combine needs a dispatch of its own"):
        rt.combine(dispatched)
    dispatched = rt.dispatch(x, (experts, weights))
    own = [np.ascontiguousarray(p["expert_input"]) for p in dispatched.parts]  # identity
    out = np.full_like(x, np.nan)
    assert rt.combine(dispatched, own, out=out) is out
    identity = (x.astype(np.float64) * np.where(experts >= 0, weights, 0).sum(1)[:, None])
    assert np.abs(out - identity).max() <= 1e-6 * np.abs(identity).max()


def test_dispatch_refuses_bad_input_and_keeps_working():
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = tokens(10, rt.hidden)
    experts, weights = rt.route(x)
    bad = x.copy()
    bad[7, 3] = np.inf
    with pytest.raises(ValueError, match=r"rank 1 \(input rows 5..9\): input x: token 2 "
                                         r"feature 3 is infinite"):
        rt.dispatch(bad, (experts, weights))
    nan_weights = weights.copy()
    nan_weights[1, 0] = np.nan
    with pytest.raises(ValueError, match="token 1 slot 0 has weight NaN"):
        rt.dispatch(x, (experts, nan_weights))
    out_of_range = experts.copy()
    out_of_range[0, 1] = rt.num_experts
    with pytest.raises(ValueError, match=f"has expert {rt.num_experts}, outside"):
        rt.dispatch(x, (out_of_range, weights))
    with pytest.raises(ValueError, match="plan: expected \\(experts, weights\\)"):
        rt.dispatch(x, experts)
    with pytest.raises(ValueError, match="weights: expected f32\\[10,2\\]"):
        rt.dispatch(x, (experts, weights[:, :1]))
    dispatched = rt.dispatch(x, (experts.astype(np.int64), weights))  # int64 ids are taken
    with pytest.raises(ValueError, match="one expert output per local rank: 2 expected, 1 given"):
        rt.combine(dispatched, [dispatched.parts[0]["expert_output"]])
    run_hand_experts(dispatched)
    expected = expected_combine(x, experts, weights)
    y = rt.combine(dispatched)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


def softmax_topk_reference(logits, k, normalize):
    """Top-k of softmax(logits) in float64; ties to the lower expert."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, order, 1)
    if normalize:
        w /= w.sum(1, keepdims=True)
    return order, w


@pytest.mark.parametrize("k, normalize", [(1, False), (2, True), (3, False)])
def test_router_alone_equals_numpy(k, normalize):
    logits = np.random.default_rng(k).standard_normal((50, 8)).astype(np.float32) * 3
    experts, weights = switchyard.route(logits, "topk", top_k=k, normalize=normalize)
    order, w = softmax_topk_reference(logits, k, normalize)
    assert (experts == order).all()
    assert np.abs(weights - w).max() <= 1e-6
    router = switchyard.Router("topk", num_experts=8, top_k=k)
    router.route(logits)
    stats = router.stats()
    assert stats["tokens"] == 50
    assert stats["counts"] == [int((order == e).sum()) for e in range(8)]


def test_router_alone_with_a_selection_bias():
    # DeepSeek-V3 style: sigmoid scores, the bias added for selection only, weights from the
    # unbiased scores, normalised.
    logits = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    bias = np.array([0, 0, 0, 0, 0, 2.0], np.float32)
    experts, weights = switchyard.route(logits, "topk", top_k=2, score="sigmoid", bias=bias)
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    chosen = np.argsort(-(s + bias), axis=1, kind="stable")[:, :2]
    w = np.take_along_axis(s, chosen, 1)
    w /= w.sum(1, keepdims=True)
    assert (experts == chosen).all() and (experts[:, 0] == 5).all()
    assert np.abs(weights - w).max() <= 1e-6


def test_router_alone_refuses_bad_input():
    with pytest.raises(ValueError, match="did you mean 'top_k'"):
        switchyard.Router("topk", num_experts=8, topk=2)
    with pytest.raises(FileNotFoundError):
        switchyard.Router("no_such_policy", num_experts=8)
    with pytest.raises(ValueError, match="expected a bool, int, float or str"):
        switchyard.Router("topk", num_experts=8, top_k=[2])
    logits = np.zeros((3, 8), np.float32)
    logits[1, 4] = np.nan
    with pytest.raises(ValueError, match="token 1"):
        switchyard.route(logits)
    with pytest.raises(ValueError, match="bias: expected f32\\[8\\]"):
        switchyard.route(logits, bias=np.zeros(7, np.float32))


@pytest.mark.skipif(not MPIRUN, reason="mpirun and the MPI/UCX transports were not built")
@pytest.mark.parametrize("launcher", ["mpirun", "launch"])
def test_two_processes_from_python(launcher):
    worker = os.path.join(os.path.dirname(__file__), "ep_worker.py")
    with tempfile.TemporaryDirectory() as out:
        if launcher == "mpirun":
            command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca", "btl",
                       "self,vader", "-x", "PYTHONPATH", "-np", "2", sys.executable, worker,
                       DEMO, "mpi", "2", out]
        else:
            command = [TOOL, "launch", "-n", "2", "--", sys.executable, worker, DEMO, "ucx", "2",
                       out]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        load = lambda what: [np.load(os.path.join(out, f"{what}_{r}.npy")) for r in range(2)]
        forward, combined, routing = load("forward"), load("combined"), load("routing")
        backward = {what: load(what) for what in ("dx", "d_gate", "held", "d_experts")}
    x = np.random.default_rng(11).standard_normal((41, 64)).astype(np.float32)
    # The layer on each rank's own tokens: bit for bit what one process with two in-process
    # ranks computes on all of them.
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    assert np.concatenate(forward).tobytes() == rt.forward(x).tobytes()
    # Dispatch and combine across the processes, with the test's experts.
    experts = np.concatenate([r[:, :2] for r in routing])
    weights = np.concatenate([r[:, 2:] for r in routing]).view(np.float32)
    expected = np.zeros(x.shape, np.float64)
    for t in range(41):
        for e, w in zip(experts[t], weights[t]):
            expected[t] += np.float64(w) * (int(e) + 1) * x[t].astype(np.float64)
    assert np.abs(np.concatenate(combined) - expected).max() <= 1e-5 * np.abs(expected).max()
    # The backward across the processes: the same bits as two in-process ranks.
    rt.training = True
    rt.forward(x)
    dy = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    dx, d_gate, d_experts = rt.backward(x, dy)
    assert np.concatenate(backward["dx"]).tobytes() == dx.tobytes()
    for r in range(2):
        assert backward["d_gate"][r].tobytes() == d_gate.tobytes()
        mine = np.concatenate([w.ravel() for e in backward["held"][r] for w in d_experts[e]])
        assert len(backward["held"][r]) > 0
        assert backward["d_experts"][r].tobytes() == mine.tobytes()


def test_output_sharing_the_inputs_memory_is_refused():
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = tokens(8, rt.hidden)
    with pytest.raises(ValueError, match="output: shares memory with the input tokens"):
        rt.forward(x, out=x)
    wide = tokens(9, rt.hidden)
    with pytest.raises(ValueError, match="shares memory"):
        rt.forward(wide[:8], out=wide[1:])


def test_threads_take_turns_on_one_runtime():
    import threading
    rt = switchyard.Runtime(DEMO, overrides={"runtime.ranks": "2"})
    x = tokens(64, rt.hidden)
    expected = rt.forward(x)
    results, errors = [], []

    def step():
        try:
            for _ in range(5):
                results.append(rt.forward(x).tobytes() == expected.tobytes())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=step) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20 and all(results)


def test_replicated_experts_dispatch_and_rebalance():
    # 8 experts on 12 slots (3 per rank): the parts name each slot's expert, copies
    # included; the caller's own experts computed per slot give the same combine; a
    # rebalance reports what it did and the forward computes the same function after it.
    rt = switchyard.Runtime(DEMO, overrides={"runtime.redundant_experts": "4"})
    x = tokens(40, rt.hidden, seed=8)
    before = rt.forward(x)
    experts, weights = rt.route(x)
    dispatched = rt.dispatch(x, (experts, weights))
    labels = sum((p["experts"] for p in dispatched.parts), [])
    assert len(labels) == 12 and sorted(set(labels)) == list(range(rt.num_experts))
    total = sum(sum(p["rows_per_expert"]) for p in dispatched.parts)
    assert total == int((experts >= 0).sum())
    run_hand_experts(dispatched)
    y = rt.combine(dispatched)
    expected = expected_combine(x, experts, weights)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    reports = rt.rebalance()
    assert [r["layer"] for r in reports] == [0]
    assert reports[0]["slots"] == 12 and reports[0]["imbalance_before"] >= 1.0
    assert reports[0]["imbalance_planned"] <= reports[0]["imbalance_before"] + 1e-9
    after = rt.forward(x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
