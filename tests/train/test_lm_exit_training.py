"""`python -m act_kernels.train lm` for the exit-rules study (design §16):
--halting pondernet trains the halting unit as an exit gate with the
per-token PonderNet objective and evaluates through exit="gate";
--sample-depth trains a fixed-depth block at a depth drawn per batch; the
refusals come before training."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from act_kernels.train import main  # noqa: E402
from test_hf_lm import lm as hf_lm  # noqa: E402


def lm(corpus, out, *extra, iterations=4):
    return hf_lm(corpus, out, "--arch", "llama", *extra, iterations=iterations)


def test_pondernet_halting_trains_the_gate_and_reloads(corpus, tmp_path):
    from act_kernels.hf import LoopedCausalLM

    out = tmp_path / "gate"
    summary = lm(corpus, out, "--layers", "3", "--block", "1", "3", "--max-steps", "4", "--halting", "pondernet",
                 "--beta", "0.05", "--exit-threshold", "0.6")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["config"]["halting"] == "pondernet" and saved["config"]["beta"] == 0.05
    assert 1 <= summary["mean_steps"] <= 4
    looped = LoopedCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate = looped(ids, exit="gate", threshold=0.6)
    assert gate.steps.min() >= 1 and gate.steps.max() <= 4
    assert float(looped.halting.bias.detach()) != -1.0            # the objective moved the halting unit (bias -1 at start)


def test_sample_depth_draws_each_batch_depth(corpus, tmp_path, monkeypatch):
    from act_kernels.hf import LoopedCausalLM

    depths = []
    forward = LoopedCausalLM.forward

    def recorded(self, *args, **kwargs):
        if self.training:
            depths.append(self.block.max_steps)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LoopedCausalLM, "forward", recorded)
    lm(corpus, tmp_path / "sampled", "--fixed-steps", "4", "--sample-depth", iterations=12)
    assert len(depths) == 12 and set(depths) <= {1, 2, 3, 4} and len(set(depths)) > 1
    saved = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert saved["mean_steps"] == 4.0                       # evaluation at the full depth
    assert saved["config"]["sample_depth"] is True


@pytest.mark.parametrize("extra,match", [
    (["--halting", "pondernet", "--layers", "4", "--block", "1", "3"], "the block must be the model's last layers"),
    (["--halting", "pondernet", "--fixed-steps", "3"], "not with --fixed-steps"),
    (["--sample-depth"], "give --fixed-steps"),
])
def test_refused_before_training(corpus, tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        lm(corpus, tmp_path / "bad", *extra)
    assert not (tmp_path / "bad" / "log.jsonl").exists()


def test_act_language_model_refuses_the_transformers_options(corpus, tmp_path):
    with pytest.raises(SystemExit, match="only with --arch llama or qwen3"):
        main(["lm", "--corpus", str(corpus), "--iterations", "2", "--out", str(tmp_path / "act"), "--arch", "act",
              "--halting", "pondernet"])
