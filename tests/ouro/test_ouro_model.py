"""act_kernels.hf.OuroForCausalLM against the independent float64 oracle
(tests/ouro/oracle.py), on tiny checkpoints written in Ouro's published
format by tests/ouro/checkpoints.py: loading with no remote code, exactness
with exit off and in the release's every-loop mode, the gate's exits with
the work skipped, generation, saving back."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
import act_kernels.hf  # noqa: E402,F401  (registers model_type "ouro")
from act_kernels.hf import OuroConfig, OuroForCausalLM  # noqa: E402

from .checkpoints import PUBLISHED_KEYS, write_ouro_checkpoint  # noqa: E402
from .oracle import greedy_decode, ouro_logits  # noqa: E402
from looped_lm import padded_batch  # noqa: E402

pytestmark = pytest.mark.xdist_group("ouro")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ouro64")
    config, params = write_ouro_checkpoint(folder, seed=0, dtype=torch.float64)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    return folder, config, params, model



def test_loads_from_the_published_format_without_remote_code(checkpoint, tmp_path):
    folder, config, params, model = checkpoint
    assert type(model) is OuroForCausalLM and config["auto_map"]          # auto_map names files that are not there
    assert not any(name.endswith(".py") for name in os.listdir(folder))
    assert set(model.state_dict()) == set(params)
    for name, tensor in params.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # sharded, bf16 and fp32 checkpoints; the model's own from_pretrained
    for dtype, shards in ((torch.bfloat16, 3), (torch.float32, 1)):
        sub = tmp_path / f"{dtype}-{shards}"
        _, written = write_ouro_checkpoint(sub, seed=1, dtype=dtype, shards=shards)
        loaded = OuroForCausalLM.from_pretrained(sub)
        assert loaded.model.embed_tokens.weight.dtype == dtype
        assert all(torch.equal(loaded.state_dict()[n], t) for n, t in written.items())


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_exit_off_equals_the_oracle(checkpoint, left):
    _, config, params, model = checkpoint
    ids, mask = padded_batch(left)
    real = mask.bool()
    want, exits = ouro_logits(params, config, ids, mask, threshold=1.0)
    with torch.no_grad():
        for kwargs in ({}, {"exit": "fixed"}):       # the config's threshold 1.0, and fixed: every loop
            out = model(ids, mask, **kwargs)
            torch.testing.assert_close(out.logits[real], want[real], rtol=0, atol=1e-10)
            assert torch.equal(out.steps[real], exits[real] + 1)
            assert bool((out.logits[~real] == 0).all())


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_every_loop_is_the_release(checkpoint, threshold):
    """every_loop: every loop computed, the gate picks the loop the head reads."""
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    real = mask.bool()
    want, exits = ouro_logits(params, config, ids, mask, threshold=threshold)
    with torch.no_grad():
        out = model(ids, mask, threshold=threshold, every_loop=True)
    torch.testing.assert_close(out.logits[real], want[real], rtol=0, atol=1e-10)
    assert torch.equal(out.steps[real], exits[real] + 1)
    assert exits[real].min() < exits[real].max()          # the gate's exits vary


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_gate_exits_skip_the_later_loops(checkpoint, threshold):
    """exit="gate": an exited token runs no later loop (ponder_cost = its
    loops = its exit); a row's first token reads no frozen token, so its
    logits and exit are the release's; later ones differ by the frozen rule."""
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    real = mask.bool()
    want, exits = ouro_logits(params, config, ids, mask, threshold=threshold)
    with torch.no_grad():
        out = model(ids, mask, threshold=threshold)
    assert torch.equal(out.ponder_cost[real], out.steps[real].float())
    assert int(out.steps[real].sum()) < 4 * int(real.sum())
    first = real.long().argmax(1)
    rows = torch.arange(3)
    torch.testing.assert_close(out.logits[rows, first], want[rows, first], rtol=0, atol=1e-10)
    assert torch.equal(out.steps[rows, first], exits[rows, first] + 1)


@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
def test_greedy_generation_equals_the_oracle(checkpoint, schedule):
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    out = model.generate(ids, mask, max_new_tokens=5, do_sample=False, exit="fixed", schedule=schedule,
                         pad_token_id=0, eos_token_id=None)
    for b in range(3):
        prompt = ids[b][mask[b].bool()]
        assert torch.equal(out[b, ids.shape[1]:], greedy_decode(params, config, prompt, 5, threshold=1.0)), b


def test_gate_generation_is_the_forward_on_its_tokens(checkpoint):
    """Generating with the gate's exits (frozen tokens, both schedules) gives
    the tokens and exits the parallel forward gives on the generated sequences."""
    _, _, _, model = checkpoint
    ids, mask = padded_batch(True)
    outs = [model.generate(ids, mask, max_new_tokens=6, do_sample=False, threshold=0.6, schedule=s,
                           pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
            for s in ("depthwise", "synchronous")]
    assert torch.equal(outs[0].sequences, outs[1].sequences) and torch.equal(outs[0].steps, outs[1].steps)
    full = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        out = model(outs[0].sequences, full, threshold=0.6)
    assert torch.equal(out.steps, outs[0].steps)
    assert torch.equal(out.logits[:, ids.shape[1] - 1:-1].argmax(-1), outs[0].sequences[:, ids.shape[1]:])


def test_saves_the_published_format(checkpoint, tmp_path):
    folder, config, params, model = checkpoint
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model_type"] == "ouro" and saved["auto_map"] == config["auto_map"]
    # every published key but rope_scaling (transformers 5 folds a null rope_scaling into rope_parameters;
    # the published OuroConfig defaults it to None) and the version stamps
    for key in PUBLISHED_KEYS:
        if key not in ("torch_dtype", "transformers_version", "rope_scaling"):
            assert key in saved, key
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "model.safetensors")
    assert set(weights) == set(params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(torch.equal(again.state_dict()[n], t) for n, t in params.items())


def test_settings_we_do_not_compute_are_refused():
    with pytest.raises(ValueError, match="unknown config keys.*'foo'"):
        OuroConfig(foo=1)
    with pytest.raises(ValueError, match="rope_scaling"):
        OuroConfig(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="sliding-window"):
        OuroConfig(use_sliding_window=True, sliding_window=128)
    with pytest.raises(ValueError, match="silu"):
        OuroConfig(hidden_act="gelu")


@pytest.mark.parametrize("setting, match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.*RoPE scaling"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}}, "rope_parameters.*RoPE scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_parameters.*rope_theta"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"total_ut_steps": 0}, "total_ut_steps"),
    ({"total_ut_steps": True}, "total_ut_steps"),
    ({"early_exit_threshold": 0.0}, "early_exit_threshold"),
    ({"early_exit_threshold": float("nan")}, "early_exit_threshold"),
    ({"every_loop": "yes"}, "every_loop"),
])
def test_settings_refused_by_name(setting, match):
    """Each refusal names its setting: OuroConfig and the vLLM plugin's check
    (after hf_overrides) run the same check_ouro_settings."""
    with pytest.raises(ValueError, match=match):
        OuroConfig(**setting)


def test_plain_rope_parameters_and_every_loop_kept(tmp_path):
    """rope_parameters of plain RoPE at rope_theta are accepted (what vLLM
    and transformers 5 write); every_loop (ours) is saved and read back."""
    config = OuroConfig(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, every_loop=True)
    config.save_pretrained(tmp_path)
    assert OuroConfig.from_pretrained(tmp_path).every_loop is True
    assert OuroConfig.from_pretrained(tmp_path).rope_theta == 1e4


def test_the_gate_trains(tmp_path):
    """Ouro's objective (pondernet, entropy=True) and ACT's loss with ponder_weight both reach the gate."""
    write_ouro_checkpoint(tmp_path, seed=2, dtype=torch.float32)
    model = OuroForCausalLM.from_pretrained(tmp_path, ponder_weight=0.01).train()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    gate = model.model.early_exit_gate.weight
    model.pondernet(ids, beta=0.01, entropy=True).loss.backward()
    assert gate.grad is not None and bool(gate.grad.abs().sum() > 0)
    gate.grad = None
    out = model(ids, labels=ids)
    assert out.loss > out.lm_loss                               # the ponder cost is in the loss
    out.loss.backward()
    assert bool(gate.grad.abs().sum() > 0)


def test_trainer_fine_tunes_the_gate(tmp_path):
    """transformers.Trainer trains a loaded Ouro by ACT with ponder_weight
    (the gate is the halting unit): the loss falls, the gate changes, and
    the checkpoint Trainer writes reloads in the published format."""
    write_ouro_checkpoint(tmp_path / "ouro", seed=3, dtype=torch.float32)
    model = OuroForCausalLM.from_pretrained(tmp_path / "ouro", ponder_weight=0.01).train()
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 61, (48, 1), generator=g) + torch.arange(10)) % 61     # rows count up by one
    data = [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row) for row in ids]
    gate = model.model.early_exit_gate.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=5, save_steps=30, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(model.model.early_exit_gate.weight.detach(), gate)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-30")
    assert type(again) is OuroForCausalLM
    torch.testing.assert_close(again.model.early_exit_gate.weight, model.model.early_exit_gate.weight.detach(),
                               atol=0, rtol=0)
