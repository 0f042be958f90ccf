"""`python -m act_kernels.train lm --arch llama | qwen3`: transformers models
looped by LoopedCausalLM, trained plain (--plain) and retrofitted with the
loop (--retrofit), with the lm command's logs, checkpoints, resume and
Ctrl-C; bad blocks refused before training; and the training package's
import graph without a circle."""
import importlib
import json
import os
import signal
import sys

import pytest

transformers = pytest.importorskip("transformers")

from act_kernels.train import main  # noqa: E402

TINY = ["--d-model", "16", "--heads", "2", "--kv-heads", "1", "--context", "16", "--batch-size", "4",
        "--eval-windows", "4", "--max-steps", "3", "--sample-bytes", "8", "--backend", "reference"]


def lm(corpus, out, *extra, iterations=4):
    return main(["lm", "--corpus", str(corpus), "--iterations", str(iterations), "--eval-every", "2",
                 "--out", str(out), *TINY, *extra])


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_looped_transformers_model_trains_logs_and_saves(arch, corpus, tmp_path):
    from act_kernels.hf import LoopedCausalLM

    out = tmp_path / arch
    summary = lm(corpus, out, "--arch", arch)
    assert [r["iteration"] for r in records(out)] == [2, 4]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["bits_per_byte"] == summary["bits_per_byte"] > 0
    c = saved["config"]
    assert (c["arch"], c["layers"], c["block"], c["heads"], c["kv_heads"]) == (arch, 4, [1, 3], 2, 1)
    assert 1 <= saved["mean_steps"] <= 3
    assert saved["layer_applications"] == pytest.approx(2 + 2 * saved["mean_steps"])
    assert (out / "summary.png").exists() and (out / "checkpoint.pt").exists()
    assert saved["sample"].startswith("def ")
    looped = LoopedCausalLM.from_pretrained(str(out))
    assert looped.block_range == (1, 3) and looped.max_steps == 3 and looped.model.config.model_type == arch


def test_fixed_steps_and_block(corpus, tmp_path):
    summary = lm(corpus, tmp_path / "fixed", "--arch", "llama", "--layers", "3", "--block", "0", "2",
                 "--fixed-steps", "2", iterations=2)
    assert summary["mean_steps"] == 2.0 and summary["config"]["block"] == [0, 2]
    assert summary["layer_applications"] == 2 * 2 + 1


def test_resume_continues_and_refuses_other_settings(corpus, tmp_path):
    out = tmp_path / "run"
    lm(corpus, out, "--arch", "qwen3", iterations=2)
    again = lm(corpus, out, "--arch", "qwen3", "--resume", iterations=4)
    assert [r["iteration"] for r in again["history"]] == [2, 4]
    assert [r["iteration"] for r in records(out)] == [2, 4]
    with pytest.raises(SystemExit, match=r"different settings \(block: \[1, 3\] there, \[0, 2\] now"):
        lm(corpus, out, "--arch", "qwen3", "--block", "0", "2", "--resume", iterations=6)
    with pytest.raises(SystemExit, match="tau"):
        lm(corpus, out, "--arch", "qwen3", "--tau", "0.5", "--resume", iterations=6)


def test_plain_then_retrofit(corpus, tmp_path):
    from act_kernels.hf import LoopedCausalLM

    plain = lm(corpus, tmp_path / "plain", "--arch", "llama", "--plain")
    assert plain["mean_steps"] == 1.0 and plain["layer_applications"] == 4 and plain["config"]["block"] is None
    assert (tmp_path / "plain" / "model.safetensors").exists() and plain["model_saved_with"] == "save_pretrained"
    # one fixed step of the loop is the plain model: the retrofit starts exactly where the plain run ended
    one = lm(corpus, tmp_path / "one", "--retrofit", str(tmp_path / "plain"), "--block", "1", "3",
             "--fixed-steps", "1", iterations=2)
    assert one["history"][0]["iteration"] == 0
    assert one["history"][0]["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], abs=1e-5)
    # the continued plain control starts there too
    cont = lm(corpus, tmp_path / "cont", "--retrofit", str(tmp_path / "plain"), "--plain", iterations=2)
    assert cont["history"][0]["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], abs=1e-6)
    act = lm(corpus, tmp_path / "act", "--retrofit", str(tmp_path / "plain"), "--block", "1", "3",
             "--tau", "0.03")
    c = act["config"]
    assert (c["arch"], c["layers"], c["block"], c["base_iterations"], c["d_model"]) == ("llama", 4, [1, 3], 4, 16)
    assert [r["iteration"] for r in records(tmp_path / "act")] == [0, 2, 4]
    looped = LoopedCausalLM.from_pretrained(str(tmp_path / "act"))
    assert looped.block_range == (1, 3)
    with pytest.raises(SystemExit, match="holds a llama model"):
        lm(corpus, tmp_path / "x", "--retrofit", str(tmp_path / "plain"), "--arch", "qwen3")
    with pytest.raises(SystemExit, match="no config.json"):
        lm(corpus, tmp_path / "x", "--retrofit", str(tmp_path / "nothing"))


@pytest.mark.parametrize("extra, message", [
    (["--arch", "llama", "--block", "2", "2"], r"--block 2 2 is empty"),
    (["--arch", "llama", "--block", "3", "1"], r"--block 3 1 is empty"),
    (["--arch", "qwen3", "--block", "1", "5"], r"--block 1 5 lies outside the model's 4 decoder layers"),
    (["--arch", "llama", "--layers", "2", "--block", "-1", "1"], r"lies outside the model's 2 decoder layers"),
    (["--arch", "llama", "--plain", "--block", "1", "3"], r"--plain trains the model without a loop"),
    (["--block", "1", "3"], r"--block: only with --arch llama or qwen3"),
    (["--arch", "act", "--plain"], r"--plain: only with --arch llama or qwen3"),
])
def test_bad_settings_are_refused_before_training(extra, message, corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        lm(corpus, out, *extra)
    assert not out.exists()


def test_a_retrofit_block_outside_the_saved_model_is_refused(corpus, tmp_path):
    lm(corpus, tmp_path / "plain", "--arch", "llama", "--plain", "--layers", "2", iterations=2)
    with pytest.raises(SystemExit, match=r"--block 1 3 lies outside the model's 2 decoder layers"):
        lm(corpus, tmp_path / "r", "--retrofit", str(tmp_path / "plain"), "--block", "1", "3")
    assert not (tmp_path / "r").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(corpus, tmp_path, monkeypatch, capsys):
    from act_kernels.train import lm as lm_module

    drawn = []
    windows = lm_module.windows

    def interrupting(*args):   # Ctrl-C during the third iteration
        drawn.append(1)
        if len(drawn) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return windows(*args)

    monkeypatch.setattr(lm_module, "windows", interrupting)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        lm(corpus, out, "--arch", "llama", iterations=100)
    assert stop.value.code == 130 and "interrupted at iteration 3" in capsys.readouterr().out
    monkeypatch.setattr(lm_module, "windows", windows)
    resumed = lm(corpus, out, "--arch", "llama", "--resume", iterations=4)
    assert [r["iteration"] for r in resumed["history"]] == [2, 4]


def test_without_transformers_the_error_names_the_extra(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers now raises ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[hf\]"'):
        lm(corpus, tmp_path / "run", "--arch", "llama")
    assert not (tmp_path / "run").exists()
    assert lm(corpus, tmp_path / "act", iterations=2)["config"]["arch"] == "act"   # ACTLanguageModel needs none


def test_the_training_package_has_no_import_circle(monkeypatch):
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("act_kernels", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("act_kernels.train.") and m.count(".") == 2)
    assert {"act_kernels.train.common", "act_kernels.train.command", "act_kernels.train.lm"} <= set(modules)
    for a in modules:
        for b in modules:
            if a < b and graph.chain_exists(a, b) and graph.chain_exists(b, a):
                pytest.fail(f"{a} and {b} import each other: {graph.find_shortest_chain(a, b)}, "
                            f"{graph.find_shortest_chain(b, a)}")
    for shared in ("act_kernels.train.common",):
        assert not graph.find_upstream_modules(shared) & {"act_kernels.train.command", "act_kernels.train.lm"}
    # and at run time: importing the shared module afresh imports neither command
    import act_kernels

    for name in [m for m in sys.modules if m == "act_kernels.train" or m.startswith("act_kernels.train.")]:
        monkeypatch.delitem(sys.modules, name)   # restored, with the modules other tests hold, at the end
    monkeypatch.setattr(act_kernels, "train", act_kernels.train, raising=False)
    importlib.import_module("act_kernels.train.common")
    assert sorted(m for m in sys.modules if m.startswith("act_kernels.train")) == \
        ["act_kernels.train", "act_kernels.train.common"]
