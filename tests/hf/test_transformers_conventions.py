"""LoopedCausalLM speaks transformers (design §15): a PreTrainedModel with its
own config, registered with the Auto classes; a ModelOutput whose loss
carries the ponder cost, so transformers.Trainer trains the halting unit;
generate with transformers' generation config, logits processors, stopping
criteria, streamers and pipeline; attention masks that are not padding
refused."""
import subprocess
import sys

import pytest
import torch

from tiny import VOCAB, batch, llama, vary

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from act_kernels.hf import LoopedCausalLM, LoopedConfig, LoopedGenerateOutput  # noqa: E402

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer of the tiny vocabulary, built offline with the tokenizers package."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def looped_llama(**kw):
    return vary(LoopedCausalLM(llama(), (1, 3), max_steps=4, **kw), seed=1, scale=0.5)


def test_a_pretrained_model_with_its_own_config():
    looped = looped_llama(ponder_weight=0.1)
    assert isinstance(looped, transformers.PreTrainedModel)
    assert isinstance(looped.config, LoopedConfig)
    assert looped.config.text_config.model_type == "llama"
    assert looped.config.block == [1, 3] and looped.config.ponder_weight == 0.1
    assert looped.can_generate()


def test_save_then_auto_model_returns_the_looped_model(tmp_path):
    looped = looped_llama(ponder_weight=0.05)
    ids, mask = batch(seed=4)
    looped.save_pretrained(tmp_path)
    for loader in (transformers.AutoModelForCausalLM, LoopedCausalLM):
        again = loader.from_pretrained(tmp_path)
        assert type(again) is LoopedCausalLM
        assert again.config.block == [1, 3] and again.config.ponder_weight == 0.05
        assert again.dtype == looped.dtype
        assert torch.equal(again.halting.weight, looped.halting.weight)
        want, got = looped(ids, mask), again(ids, mask)
        torch.testing.assert_close(got.logits, want.logits)   # the rotary table is rebuilt in float64
        assert torch.equal(got.steps, want.steps)


def test_without_act_kernels_hf_the_folder_is_refused(tmp_path):
    looped_llama().save_pretrained(tmp_path)
    code = ("import transformers, sys\n"
            f"try:\n    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "except (ValueError, KeyError) as e:\n    print('REFUSED', e); sys.exit(0)\n"
            "print('LOADED'); sys.exit(1)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "REFUSED" in run.stdout, run.stdout + run.stderr
    assert "act_kernels_looped" in run.stdout


def test_output_is_a_model_output_whose_loss_carries_the_ponder_cost():
    ids, mask = batch(seed=5)
    plain, weighted = looped_llama(), looped_llama(ponder_weight=0.25)
    out, out_w = plain(ids, mask, labels=ids), weighted(ids, mask, labels=ids)
    assert isinstance(out, transformers.utils.ModelOutput)
    assert out["loss"] is out.loss and out.to_tuple()[0] is out.loss
    assert torch.equal(out.loss, out.lm_loss)
    real = mask.bool()
    torch.testing.assert_close(out_w.loss, out_w.lm_loss + 0.25 * out_w.ponder_cost[real].mean())
    torch.testing.assert_close(out_w.lm_loss, out.lm_loss)
    out_w.loss.backward()
    assert weighted.halting.weight.grad is not None and bool(weighted.halting.weight.grad.abs().sum() > 0)
    assert plain(ids, mask).loss is None


@pytest.mark.parametrize("mask_row", [[1, 1, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
def test_attention_masks_that_are_not_padding_are_refused(mask_row):
    looped = looped_llama()
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, mask_row])
    with pytest.raises(ValueError, match="attention_mask"):
        looped(ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        looped.generate(ids, mask, max_new_tokens=2)


def test_trainer_trains_the_model_and_its_halting_unit(tmp_path):
    torch.manual_seed(0)
    looped = LoopedCausalLM(llama(dtype=torch.float32), (1, 3), max_steps=3, ponder_weight=0.01).train()
    g = torch.Generator().manual_seed(0)
    # a learnable stream: each row counts up by one from a random start
    starts = torch.randint(0, VOCAB, (64, 1), generator=g)
    ids = (starts + torch.arange(12)) % VOCAB
    data = [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row) for row in ids]
    halting_before = looped.halting.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=5, save_steps=40, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=looped, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(looped.halting.weight.detach(), halting_before)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-40")
    assert type(again) is LoopedCausalLM
    torch.testing.assert_close(again.halting.weight, looped.halting.weight.detach(), atol=0, rtol=0)


def test_generate_returns_a_tensor_or_an_output_like_transformers():
    looped = looped_llama()
    ids, mask = batch(seed=6)
    seqs = looped.generate(ids, mask, max_new_tokens=4)
    assert isinstance(seqs, torch.Tensor) and seqs.shape == (ids.shape[0], ids.shape[1] + 4)
    out = looped.generate(ids, mask, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, LoopedGenerateOutput) and torch.equal(out.sequences, seqs)
    assert out.steps.shape == seqs.shape and len(out.scores) == 4 and out.scores[0].shape == (ids.shape[0], VOCAB)
    # greedy: each new token is the argmax of its scores
    for t, column in enumerate(out.scores):
        assert torch.equal(column.argmax(-1), seqs[:, ids.shape[1] + t])
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert looped.generate(ids, mask, generation_config=config).shape[1] == ids.shape[1] + 3
    with pytest.raises(TypeError, match="unexpected"):
        looped.generate(ids, mask, max_new_tokens=2, not_an_option=1)


def dense_repetition_penalty_greedy(looped, ids, new, penalty):
    """The reference: transformers' own generate on the looped model's every-token forward (no cache)."""
    seq = ids.clone()
    for _ in range(new):
        logits = looped(seq).logits[:, -1]
        picked = torch.gather(logits, 1, seq)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        seq = torch.cat([seq, logits.scatter(1, seq, picked).argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
def test_processors_run_under_both_schedules(schedule):
    looped = looped_llama()
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    got = looped.generate(ids, max_new_tokens=5, repetition_penalty=3.0, schedule=schedule, max_batch_size=2)
    assert torch.equal(got, dense_repetition_penalty_greedy(looped, ids, 5, 3.0))

    class Ban(transformers.LogitsProcessor):     # a caller's processor: never the greedy token of plain decoding
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([int(plain[0, 5])]), -float("inf"))

    plain = looped.generate(ids[:1], max_new_tokens=1, schedule=schedule)
    banned = looped.generate(ids[:1], max_new_tokens=1, schedule=schedule,
                             logits_processor=transformers.LogitsProcessorList([Ban()]))
    assert banned[0, 5] != plain[0, 5]
    eos = int(plain[0, 5])
    floor = looped.generate(ids[:1], max_new_tokens=3, min_new_tokens=2, eos_token_id=eos, schedule=schedule)
    assert floor.shape[1] >= 5 + 2 and eos not in floor[0, 5:7].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])      # warpers only (every row at once), or a processor reading the rows
@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
def test_sampling_with_warpers_repeats_per_sequence(schedule, penalty):
    looped = looped_llama()
    ids, mask = batch(seed=8)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=penalty)
    a = looped.generate(ids, mask, generator=torch.Generator().manual_seed(1), schedule=schedule, **kw)
    b = looped.generate(ids, mask, generator=torch.Generator().manual_seed(1), schedule="depthwise",
                        max_batch_size=1, **kw)
    assert torch.equal(a, b)
    c = looped.generate(ids, mask, generator=torch.Generator().manual_seed(2), schedule=schedule, **kw)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
def test_stopping_criteria_end_a_sequence(schedule):
    looped = looped_llama()
    ids, mask = batch(seed=9)

    class AfterTwo(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - ids.shape[1] >= 2, dtype=torch.bool)

    full = looped.generate(ids, mask, max_new_tokens=6, schedule=schedule)
    short = looped.generate(ids, mask, max_new_tokens=6, schedule=schedule,
                            stopping_criteria=transformers.StoppingCriteriaList([AfterTwo()]))
    assert torch.equal(short, full[:, :ids.shape[1] + 2])


def test_text_streamer_and_pipeline(tokenizer, capsys):
    looped = looped_llama()
    looped.generation_config.pad_token_id = tokenizer.pad_token_id
    prompt = "w1 w2 w3"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    streamer = transformers.TextStreamer(tokenizer, skip_prompt=True)
    out = looped.generate(ids, max_new_tokens=5, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.split() == tokenizer.decode(out[0, ids.shape[1]:]).split()
    pipe = transformers.pipeline("text-generation", model=looped, tokenizer=tokenizer)
    text = pipe(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    # the pipeline joins the prompt's text and the new tokens' text without a separator
    assert text.replace(" ", "") == tokenizer.decode(out[0]).replace(" ", "")


def test_transformers_defaults_and_what_generate_refuses():
    looped = looped_llama()
    ids, mask = batch(seed=10)
    # no max_new_tokens: transformers' default max_length (20 columns in all)
    assert looped.generate(ids, mask).shape == (ids.shape[0], 20)
    assert looped.generate(ids, mask, max_length=12).shape == (ids.shape[0], 12)
    for kw, match in ((dict(num_beams=2), "beam_search"), (dict(penalty_alpha=0.5, top_k=4), "contrastive"),
                      (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
                      (dict(output_logits=True, return_dict_in_generate=True), "output_logits"),
                      (dict(streamer=transformers.TextStreamer(None)), "batch size 1"),
                      (dict(stop_strings=["w5"]), "tokenizer")):
        with pytest.raises(ValueError, match=match):
            looped.generate(ids, mask, max_new_tokens=2, **kw)


def test_resized_embeddings():
    looped = looped_llama()
    looped.resize_token_embeddings(VOCAB + 5)
    assert looped.vocab_size == looped.config.vocab_size == VOCAB + 5
    assert looped(torch.tensor([[VOCAB + 4]])).logits.shape[-1] == VOCAB + 5
