"""The training command never loses work and says what it does: --help, the
evaluation log, resume errors, Ctrl-C, and a missing matplotlib."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from act_kernels.train import main

SMALL = ["--batch-size", "8", "--hidden", "16", "--eval-batches", "1", "--no-progress"]


def test_help_shows_every_option_with_its_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 15000)" in text and "(default: 0.001)" in text and "(default: auto)" in text
    assert "{act,pondernet}" in text and "{addition,logic,parity,pointer,sort}" in text
    options = [a for a in text.split() if a.startswith("--") and a not in ("--help",)]
    assert {"--iterations", "--tau", "--resume", "--eval-knob", "--method"} <= set(o.strip(",") for o in options)


def test_evaluation_log_is_json_lines(tmp_path):
    main(["parity", "--iterations", "6", "--eval-every", "2", "--out", str(tmp_path), *SMALL])
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [2, 4, 6]
    assert {"loss", "error", "token_error", "mean_steps", "seconds"} <= set(records[0])


def test_resume_of_a_corrupted_checkpoint_names_the_file(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"cannot resume from {tmp_path / 'checkpoint.pt'}.*not a readable"):
        main(["parity", "--iterations", "4", "--eval-every", "2", "--out", str(tmp_path), "--resume", *SMALL])


def test_resume_of_a_mismatched_checkpoint_names_the_file_and_the_difference(tmp_path):
    main(["parity", "--iterations", "2", "--eval-every", "2", "--out", str(tmp_path), *SMALL])
    other = [a if a != "16" else "8" for a in SMALL]
    with pytest.raises(SystemExit, match=r"checkpoint.pt: it was written for a different run \(hidden: 16"):
        main(["parity", "--iterations", "4", "--eval-every", "2", "--out", str(tmp_path), "--resume", *other])


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "act_kernels.train", "parity", "--iterations", "100000", "--eval-every", "5",
           "--out", str(tmp_path), *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:                 # wait until training is under way
        lines.append(line)
        if line.startswith("it 5:"):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted at iteration" in rest and "Traceback" not in rest
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    assert ckpt["iteration"] >= 5
    resumed = main(["parity", "--iterations", str(ckpt["iteration"] + 5), "--eval-every", "5", "--out", str(tmp_path),
                    "--resume", *SMALL])
    assert resumed["history"][-1]["iteration"] == ckpt["iteration"] + 5


def test_missing_matplotlib_is_said_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    main(["parity", "--iterations", "2", "--eval-every", "2", "--out", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert out.index("matplotlib is not installed") < out.index("it 2:")
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "summary.png").exists()
