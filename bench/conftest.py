"""Collects every benchmark's figures into bench/results/<device>.json (device,
date, torch/triton versions, commit). The file is rewritten after every row,
so a run cut short keeps what it measured, and rows from an earlier run on the
same device are kept unless this run measures the same row again (so the
kernel sweep and the end-to-end runs can be separate invocations)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

# ACT_BENCH_RESULTS redirects the JSON (a device run writes straight to its output folder)
RESULTS = Path(os.environ.get("ACT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
_rows: list = []
_meta: dict = {}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}"


def _commit() -> str:
    # a copy of the tree without .git (a remote device run) passes it in
    if os.environ.get("ACT_BENCH_COMMIT"):
        return os.environ["ACT_BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).resolve().parent, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_of(benchmark) -> float:
    """The median time of the benchmark just run; skips the row under
    --benchmark-disable (the code ran once, untimed)."""
    if benchmark.stats is None:
        pytest.skip("benchmarks disabled: no timing to record")
    return benchmark.stats.stats.median


@pytest.fixture
def timer(request) -> str:
    """The clock pytest-benchmark times with (--benchmark-timer), recorded
    with every row: time.process_time on a shared machine."""
    return str(request.config.getoption("benchmark_timer")).replace("time.", "")


def synced(fn):
    """fn(), the device synchronised after it (what a timed round includes)."""
    out = fn()
    sync()
    return out


@pytest.fixture
def record(benchmark):
    """record(group, name, **figures): keeps the median time of the benchmark
    just run, with the figures that describe it."""

    def _record(group, name, **figures):
        if benchmark.stats is None:  # --benchmark-disable: the code ran once, untimed
            pytest.skip("benchmarks disabled: no timing to record")
        stats = benchmark.stats.stats
        row = dict(group=group, name=name, median_s=stats.median, min_s=stats.min,
                   rounds=stats.rounds, **figures)
        benchmark.extra_info.update(figures)
        _rows.append(row)
        _write()
        return row

    return _record


@pytest.fixture(scope="session")
def meta():
    return _meta


# The fields of a row that say which configuration it measured: the parameters
# the bench files pass to record() (and the clock it was timed by: rows timed by
# another clock are kept beside each other). Every other field is measured or
# derived from what was measured (times, tokens/s, mean steps, iterations,
# ideals, byte and row counts) and may differ between two runs of the same
# configuration, so it is no part of a row's identity.
CONFIG_FIELDS = frozenset((
    "group", "name", "timer", "threads", "dtype", "kind", "case", "schedule", "source", "mix",
    "batch", "rows", "hidden", "length", "d_model", "heads", "dim", "causal", "running", "steps",
    "prompts", "slots", "new_tokens", "max_steps", "mean_steps_setting", "threshold", "num_steps", "layers",
    "loops", "unrolled_layers",
))


def _row_key(row):
    """A row's identity when results are merged: its configuration only, so a
    new run of the same benchmark replaces the old row whatever it measured."""
    return tuple(sorted((k, v) for k, v in row.items() if k in CONFIG_FIELDS))


def _write():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = RESULTS / f"{slug}.json"
    kept, meta = [], {}
    if path.exists():
        old = json.loads(path.read_text())
        mine = {_row_key(r) for r in _rows}
        if len(mine) < len(_rows):   # two configurations this run measured look alike: a parameter is missing above
            warnings.warn("bench/conftest.py: rows of this run share an identity; add the parameter that tells them "
                          "apart to CONFIG_FIELDS, or earlier rows of one may replace the other's", stacklevel=1)
        kept = [r for r in old.get("rows", []) if _row_key(r) not in mine]
        meta = {k: v for k, v in old.items() if k.endswith("_GBps")}
    commit = _commit()
    for r in _rows:
        r.setdefault("commit", commit)
    out = dict(
        device=device,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        commit=commit,
        **{**meta, **_meta},
        rows=kept + _rows,
    )
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return path


def pytest_sessionfinish(session, exitstatus):
    if _rows:
        print(f"\nbenchmark results written to {_write()}")
