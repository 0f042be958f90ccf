import math
import os

import pytest
import torch

# Triton kernels run on the CPU only under the interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device")
    not_asked = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(not_asked)


@pytest.fixture
def corpus(tmp_path):
    """A small Python-like text file to train the byte LM on (the training command's tests)."""
    path = tmp_path / "corpus.py"
    path.write_text("def f(x):\n    # add one\n    return x + 1  # 'quoted'\n" * 60)
    return path
