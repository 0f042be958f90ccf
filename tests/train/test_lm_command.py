"""`python -m act_kernels.train lm`: the byte LM on a corpus, with its
evaluation log, checkpoints and resume, the fixed-depth baseline, the
closing sample, and the byte classes its study reports steps by."""
import json

import pytest
import torch

from act_kernels.train import main
from act_kernels.train.lm import BYTE_CLASSES, byte_classes, read_corpus

TINY = ["--d-model", "16", "--heads", "2", "--context", "16", "--batch-size", "4", "--eval-windows", "4",
        "--max-steps", "3", "--sample-bytes", "8", "--backend", "reference"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.py"
    path.write_text("def f(x):\n    # add one\n    return x + 1  # 'quoted'\n" * 60)
    return path


def test_trains_logs_and_samples(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    summary = main(["lm", "--corpus", str(corpus), "--iterations", "4", "--eval-every", "2", "--out", str(out),
                    *TINY])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert {"bits_per_byte", "mean_steps", "train_bits_per_byte", "seconds"} <= set(records[0])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["bits_per_byte"] == summary["bits_per_byte"] > 0
    assert 1 <= saved["mean_steps"] <= 3 and set(saved["steps_by_class"]) == set(BYTE_CLASSES)
    assert saved["sample"].startswith("def ") and "sample:\ndef " in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists()


def test_fixed_depth_runs_every_token_k_steps(corpus, tmp_path):
    summary = main(["lm", "--corpus", str(corpus), "--iterations", "2", "--eval-every", "2", "--fixed-steps", "2",
                    "--out", str(tmp_path / "fixed"), *TINY])
    assert summary["mean_steps"] == 2.0


def test_resume_continues_and_refuses_other_settings(corpus, tmp_path):
    out = tmp_path / "run"
    main(["lm", "--corpus", str(corpus), "--iterations", "2", "--eval-every", "2", "--out", str(out), *TINY])
    again = main(["lm", "--corpus", str(corpus), "--iterations", "4", "--eval-every", "2", "--out", str(out),
                  "--resume", *TINY])
    assert [r["iteration"] for r in again["history"]] == [2, 4]
    with pytest.raises(SystemExit, match="different settings"):
        main(["lm", "--corpus", str(corpus), "--iterations", "4", "--eval-every", "2", "--out", str(out),
              "--resume", *TINY, "--tau", "0.5"])


def test_the_default_corpus_is_the_standard_library():
    train, held, described = read_corpus("", 200_000)
    assert "stdlib" in described and len(train) > len(held) > 0
    assert b"def " in train and b"import " in held


def test_byte_classes():
    text = b"x = 12  # c\n    s = 'a#b'\n"
    names = [BYTE_CLASSES[c] for c in byte_classes(text).tolist()]
    assert names[0] == "line start" and names[4] == "digit" and names[8] == "comment"
    assert names[text.index(b"    ") + 1] == "indentation"
    assert names[text.index(b"a#b")] == "in string" and names[text.index(b"s =")] == "identifier"
    assert len(names) == len(text) and torch.is_tensor(byte_classes(text))


def test_too_small_a_corpus_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("tiny")
    with pytest.raises(SystemExit, match="too little text"):
        main(["lm", "--corpus", str(path), *TINY])
