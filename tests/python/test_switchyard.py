"""The Python module against what it must do: the layer equals its dense reference and is
bit-identical to `switchyard run` on the same config and tokens; tensors are used in place
(NumPy and DLPack objects, `out=`); every error raises the matching exception class with
the C++ message. Run by CTest with PYTHONPATH=build/python and Debian's python3."""
import os
import subprocess
import tempfile

import numpy as np
import pytest

import switchyard

TOOL = os.environ["SWITCHYARD_TOOL"]
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
    with pytest.raises(switchyard.UnavailableError) as launcher:
        switchyard.Runtime.from_string('[runtime]\ntransport = "mpi"\n')
    assert "mpirun" in str(launcher.value)


def test_plugins_are_listed():
    names = {(p["kind"], p["name"]) for p in switchyard.Runtime(DEMO).plugins()}
    assert ("transport", "inproc") in names and ("router", "topk") in names
