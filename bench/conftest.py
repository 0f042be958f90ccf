"""Collects every benchmark's figures and writes bench/results/<device>.json
(device, date, torch/triton versions, commit) at the end of the session."""
from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"
_rows: list = []
_meta: dict = {}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=RESULTS.parent, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
        return row

    return _record


@pytest.fixture(scope="session")
def meta():
    return _meta


def pytest_sessionfinish(session, exitstatus):
    if not _rows:
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = dict(
        device=device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        commit=_commit(),
        **_meta,
        rows=_rows,
    )
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", out["device"]).strip("-").lower()
    path = RESULTS / f"{slug}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nbenchmark results written to {path}")
