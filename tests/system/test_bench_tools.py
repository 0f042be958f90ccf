"""The benchmark tools outside the timed code: bench/conftest.py's merge of a
run's rows into bench/results/<device>.json (a row's identity is its
configuration, never what it measured) and bench/report.py's reading of
bench/vllm_looped.py's and bench/vllm_huginn.py's results files. Synthetic
rows only: nothing is timed."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name, path):
    # by file, under a name of its own: bench/conftest.py is not tests/conftest.py
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_conftest():
    return _load("bench_conftest_under_test", BENCH / "conftest.py")


@pytest.fixture(scope="module")
def report():
    return _load("bench_report_under_test", BENCH / "report.py")


def _exit_row(**changes):
    row = {"group": "exit_generate", "name": "gate", "median_s": 3.19, "min_s": 3.14, "rounds": 3, "batch": 16,
           "new_tokens": 32, "d_model": 256, "max_steps": 8, "threshold": 0.7, "mean_steps": 2.581,
           "steps_run_per_token": 2.581, "iterations": 103, "ideal_speedup": 2.513, "speedup_vs_fixed": 1.54,
           "tokens_per_s": 160.4, "timer": "process_time", "commit": "0715ab7"}
    return {**row, **changes}


def test_row_key_is_the_configuration_only(bench_conftest):
    key = bench_conftest._row_key
    old = _exit_row()
    # measured outputs (and the commit) differ between two runs of one configuration
    assert key(old) == key(_exit_row(mean_steps=2.588, steps_run_per_token=2.588, iterations=106,
                                     ideal_speedup=2.508, speedup_vs_fixed=1.61, tokens_per_s=362.7,
                                     median_s=1.41, min_s=1.17, commit="3250cbe"))
    # a parameter, or the clock, makes another row
    assert key(old) != key(_exit_row(threshold=0.9))
    assert key(old) != key(_exit_row(timer="perf_counter"))
    assert key(old) != key(_exit_row(name="latent"))


def test_merge_replaces_a_row_that_differs_only_in_a_measured_field(bench_conftest, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_conftest, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_conftest, "device_name", lambda: "cpu-test")
    other = _exit_row(name="latent", threshold=0.3)
    (tmp_path / "cpu-test.json").write_text(json.dumps({"device": "cpu-test", "rows": [_exit_row(), other]}))
    new = _exit_row(mean_steps=2.588, tokens_per_s=362.7, median_s=1.41, commit="3250cbe")
    monkeypatch.setattr(bench_conftest, "_rows", [new])
    rows = json.loads(bench_conftest._write().read_text())["rows"]
    assert rows == [other, new]


def test_merge_warns_when_two_rows_of_a_run_look_alike(bench_conftest, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_conftest, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_conftest, "device_name", lambda: "cpu-test")
    (tmp_path / "cpu-test.json").write_text(json.dumps({"device": "cpu-test", "rows": []}))
    # a parameter CONFIG_FIELDS does not know tells these two apart
    monkeypatch.setattr(bench_conftest, "_rows", [_exit_row(unknown_parameter=1), _exit_row(unknown_parameter=2)])
    with pytest.warns(UserWarning, match="share an identity"):
        bench_conftest._write()


def _vllm_entry(size, eager=True):
    speed = {"vllm_looped_act": 629.5, "vllm_unrolled": 560.6, "ours_depthwise": 717.8}
    ratios = {"act_vs_vllm_unrolled": {"median": 1.123, "range": [0.818, 1.221]},
              "act_vs_ours_depthwise": {"median": 0.939, "range": [0.688, 1.079]}}
    if eager:
        speed["vllm_unrolled_eager"] = 468.3
        ratios["act_vs_vllm_unrolled_eager"] = {"median": 1.344, "range": [0.955, 1.595]}
    clock = {"tokens_per_s": speed, "ratios": ratios, "share_of_ideal": 0.421}
    return {"size": size, "new_tokens": 48 * size, "ours_mean_steps_new_tokens": 2.169, "ideal": 2.6664,
            "greedy_agree": size == 16, "cpu_s": clock, "wall_s": clock}


def _vllm_file(eager=True):
    return {"benchmark": "bench/vllm_looped.py", "date": "2026-12-07T03:04:36", "device": "cpu x86_64",
            "commit": "f1b8629", "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu"},
            "model": {"source": "random", "mix": "shallow", "max_steps": 8, "unrolled_layers": 18},
            "new_tokens_each": 48, "slots": 64, "repeats": 5,
            "compilation": {"vllm_looped_act": {"enforce_eager": False}, "vllm_unrolled": {"enforce_eager": False},
                            "vllm_unrolled_eager": {"enforce_eager": True}},
            "results": [_vllm_entry(16, eager), _vllm_entry(64, eager)], "rounds": []}


def test_report_reads_the_vllm_looped_file(report):
    data = _vllm_file()
    assert report.kind(data) == "vllm_looped"
    text = report.TABLES["vllm_looped"](data)
    assert "torch 2.13.0+cpu" in text and "vllm 0.32.0" in text   # the versions under "versions"
    assert "(`cpu_s`)" in text and "(`wall_s`)" in text
    assert "| vLLM unrolled, compiled (tok/s) |" in text and "| vLLM unrolled, eager (tok/s) |" in text
    row = ("| 16 | 2.17 | 630 | 561 | 1.12 x (0.82-1.22) | 468 | 1.34 x (0.95-1.59) | 2.67 x | 42 % | 718 "
           "| 0.94 x (0.69-1.08) | yes |")
    assert text.count(row) == 2   # one table per clock
    assert "| 64 | 2.17 | 630 |" in text and text.rstrip().endswith("| no |")


def test_report_leaves_out_the_eager_engine_when_the_file_has_none(report):
    text = report.TABLES["vllm_looped"](_vllm_file(eager=False))
    assert "eager" not in text
    assert "| 16 | 2.17 | 630 | 561 | 1.12 x (0.82-1.22) | 2.67 x | 42 % | 718 | 0.94 x (0.69-1.08) | yes |" in text


def test_report_prints_a_folder_with_the_vllm_looped_file(report, tmp_path, capsys):
    (tmp_path / "vllm_looped_cpu.json").write_text(json.dumps(_vllm_file()))
    report.main([str(tmp_path)])
    out = capsys.readouterr()
    assert "bench/vllm_looped.py" in out.out and "skipped" not in out.err


def _huginn_file():
    def clock(latent):
        return {"tokens_per_s": {"vllm_latent": latent, "vllm_fixed": 500.0, "ours_depthwise": 400.0},
                "ratios": {"latent_vs_vllm_fixed": {"median": latent / 500.0, "range": [1.1, 1.3]},
                           "latent_vs_ours_depthwise": {"median": latent / 400.0, "range": [1.4, 1.6]}},
                "share_of_ideal": round(latent / 500.0 / 1.9, 3)}

    results = [{"size": size, "new_tokens": 48 * size, "mean_steps": 3.6, "ideal": 1.9, "cpu_s": clock(600.0),
                "wall_s": clock(610.0), "latent_agree_first_4": True, "fixed_agree_share": 1.0 if size == 16 else 0.9}
               for size in (16, 64)]
    return {"benchmark": "bench/vllm_huginn.py", "date": "2026-12-07T05:40:00", "device": "cpu x86_64",
            "commit": "abc1234", "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu"},
            "model": {"num_steps": 8, "threshold": 0.2, "contraction": 0.3}, "new_tokens_each": 48, "repeats": 3,
            "results": results, "rounds": []}


def test_report_reads_the_vllm_huginn_file(report):
    """Its own kind (it has "size" and "cpu_s" under "results" too, but not the looped file's fields)."""
    data = _huginn_file()
    assert report.kind(data) == "vllm_huginn"
    text = report.TABLES["vllm_huginn"](data)
    assert "vllm 0.32.0" in text and "latent-diff at 0.2" in text
    assert "| 16 | 3.60 | 600 | 500 | 1.20x (1.10-1.30) | 1.90x | 63% | 400 | 1.50x (1.40-1.60) | yes |" in text
    assert text.rstrip().endswith("| no |")   # a fixed-depth engine that disagreed with ours on one prompt in ten
    assert "release" not in text   # no release engine in the file
