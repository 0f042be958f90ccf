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


def _row_key(row):
    # what a row measured, without the timings and the figures derived from them
    derived = ("median_s", "min_s", "rounds", "GBps", "TFLOPs", "tokens_per_s", "per_step_s", "commit", "speedup_vs_fixed")
    return tuple(sorted((k, v) for k, v in row.items() if k not in derived))


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
