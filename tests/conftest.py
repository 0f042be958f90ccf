import math
import os

import pytest
import torch
from _pytest.mark.structures import ParameterSet

# Triton kernels run on the CPU only under the interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# True where the Triton kernels run under the interpreter (CPU-only machines):
# there the grids marked `representative` run one case by default (see below)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Under pytest-xdist (one worker per core, pyproject's addopts) each worker
# computes on one thread, so that the workers do not oversubscribe the cores;
# subprocesses the tests start (distributed ranks, the train commands, the
# sm_90 compiles) inherit the same setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:   # already set, or inter-op work already ran
        pass

_empty, _empty_like = torch.empty, torch.empty_like


@torch.no_grad()   # a fresh tensor may be created with requires_grad=True (compilers do)
def _poison(t):
    if t.is_floating_point():
        t.fill_(math.nan)
    elif t.dtype == torch.bool:
        t.fill_(True)
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-(2**30))
    return t


@pytest.fixture(autouse=True)
def poison_fresh_outputs(monkeypatch):
    """Every fresh torch.empty is filled with NaN (True, -2**30 for bool and
    int), so an output element a kernel fails to write fails the test."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: minutes long; outside the default suite, run with --run-slow")
    config.addinivalue_line(
        "markers", "representative(*cases, key, values): a parametrized grid that runs Triton; under the "
                   "interpreter only the cases with these parameters run by default, the rest with --run-slow "
                   "(helpers.representative)")


def _params_of_marks(item):
    """The test's parametrize marks as (argnames, list of value tuples)."""
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for value in mark.args[1]:
            if isinstance(value, ParameterSet):
                rows.append(tuple(value.values))
            else:
                rows.append(tuple(value) if len(names) > 1 else (value,))
        yield names, rows


def _check_representative(item, chosen):
    """A representative must name a case the grid has: every name a
    parameter, every value one of its values (jointly, for parameters
    listed in one parametrize), else the grid would have no default case."""
    marks = list(_params_of_marks(item))
    names = {n for argnames, _ in marks for n in argnames}
    for name in chosen:
        if name not in names:
            raise pytest.UsageError(f"{item.nodeid}: representative names {name!r}, which is not a parameter")
    for argnames, rows in marks:
        mine = [n for n in argnames if n in chosen]
        if mine and not any(all(row[argnames.index(n)] == chosen[n] for n in mine) for row in rows):
            raise pytest.UsageError(f"{item.nodeid}: representative {dict((n, chosen[n]) for n in mine)} "
                                    f"is not a case of the grid {argnames}")


def _interpreter_grid_case_is_slow(item):
    """True for a case of a `representative` grid that runs Triton under the
    interpreter and is not the grid's representative case."""
    mark = item.get_closest_marker("representative")
    if mark is None or not INTERPRETED or not hasattr(item, "callspec"):
        return False
    cases, key, values = mark.args, mark.kwargs["key"], mark.kwargs["values"]
    for chosen in cases:
        _check_representative(item, chosen)
    params = item.callspec.params
    if key in params and params[key] not in values:
        return False   # a case that runs no Triton (the reference, the twins, the C++ CPU kernels): fast
    return not any(all(params[name] == value for name, value in chosen.items()) for chosen in cases)


# The default suite's longest tests (node-id prefixes, longest first): they start
# first, so that under xdist no worker is left running one of them alone at the
# end. Ahead-of-time sm_90 compiles (a minute or more with a cold Triton cache),
# process starts, Triton under the interpreter over a whole model or gradcheck.
LONGEST_FIRST = (
    "tests/system/test_triton_resources.py",
    "tests/system/test_triton_compile.py",
    "tests/system/test_distributed.py",
    "tests/system/test_depthwise_host_work.py",
    "tests/system/test_lm_host_work.py",
    "tests/system/test_compile.py",
    "tests/act/test_act_backends.py::test_gradcheck_float64",
    "tests/system/test_gpu_shapes.py",
    "tests/system/test_encoder_host_work.py",
    "tests/nn/test_language_model.py::test_generation_on_triton_under_the_interpreter",
    "tests/pondernet/test_pondernet.py::test_sample_mode_is_geometric_and_repeatable",
    "tests/train/test_train_command.py::test_ctrl_c_saves_a_checkpoint_and_exits_cleanly",
)


def _start_rank(item):
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device")
    not_asked = pytest.mark.skip(reason="slow: run with --run-slow")
    grid = pytest.mark.skip(reason="a Triton-interpreter grid's further case (its representative runs "
                                   "by default): run with --run-slow")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if _interpreter_grid_case_is_slow(item):
            item.add_marker(pytest.mark.slow)
            if not run_slow:
                item.add_marker(grid)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(not_asked)
    items.sort(key=_start_rank)   # stable: the rest keep their order


@pytest.fixture
def corpus(tmp_path):
    """A small Python-like text file to train the byte LM on (the training command's tests)."""
    path = tmp_path / "corpus.py"
    path.write_text("def f(x):\n    # add one\n    return x + 1  # 'quoted'\n" * 60)
    return path
