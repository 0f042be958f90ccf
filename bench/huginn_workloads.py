"""The Huginn workloads of bench/test_bench_huginn.py: a tiny Huginn
(recurrent-depth LM: a prelude, a recurrent core block with the input
injection adapter run num_steps times, a coda) as
`act_kernels.hf.HuginnForCausalLM`, loaded from a checkpoint in the
published format (tests/huginn/checkpoints.py), generating with Huginn's
"kl" exit criterion (each new token leaves the recurrence on its own, its
later steps skipped, depth-wise), against the baseline a user runs today:
the release's behaviour for a batch, every token all num_steps.

The model: n_embd 256, 4 heads of 64, intermediate 688, 1 prelude + 2 core
+ 1 coda layers, byte vocabulary (256, padded 256), block_size 512, the
checkpoint's random weights (seed 0). init_values.std is 0, so the initial
state s_0 is zeros (deterministic: no draw; the published rule draws a
truncated normal when std > 0).

The baselines, every token every one of num_steps steps:
- the release (`ReleaseHuginn`), written here as the published remote code
  (raven_modeling_minimal.py) runs a batch through transformers' generate:
  dense, every row runs every step, keys and values in a transformers
  DynamicCache, one slot per (step, layer): prelude layer i at i, core layer
  i of step n at P + n K + i, coda layer i at P + N K + i (the release's
  HuginnDynamicCache keys them by the same running block index, the coda at
  fixed negative ones); the sandwich block, fused Wqkv, qk_bias before a RoPE
  of adjacent pairs, SDPA, gated MLP, ln_f before and after the coda, the
  tied head. It reads the HuginnForCausalLM's own parameters (no copy).
  Unlike the release it honours attention_mask (positions count from each
  row's first real token, padding never attended; the release ignores the
  mask and would attend the padding), so that left-padded rows give our
  tokens; the cost is the same. `check_release` checks its logits against
  ours with no exit and its greedy tokens against our no-exit generate (both
  schedules) on a few left-padded prompts.
- ours with no exit (`exit` off): schedule "depthwise" and "synchronous".

Ours: exit="kl" (KL(P_prev || P_n) < threshold, P_prev starting uniform,
min_steps 0), the thresholds (`THRESHOLDS`) giving mean exits of the new
tokens of about 40, 50 and 60 % of num_steps when generating for 16 prompts
(`calibrate` finds them again). The prompts run num_steps in every case. The
criterion reads each step's next-token distribution, so each step of a new
token also runs the coda and the head (the release's evaluator does too).

Generation: 48 new tokens (greedy, no eos) for left-padded prompts of
32..128 bytes. Ideal (the brief's): num_steps over the mean steps of the new
tokens, N / mean (core layers only); counting the prelude and coda layers
(P + C + K N) / (P + C + K mean); beside them, what the criterion's coda at
every step leaves, (P + C + K N) / (P + (K + C) mean). Depth-wise, a
batch's block iterations are set by its deepest row (the sum of its tokens'
steps, the prefill's num_steps added), so they fall by less than N / mean:
`iteration_ideal` is the no-exit iterations over kl's.

    OMP_NUM_THREADS=1 python bench/huginn_workloads.py [--cpu-time] [--steps 8,16] [--fractions 0.5]
        [--calibrate] [BATCH ...]
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from hf_workloads import (capture_caches, dynamic_cache_bytes, interleaved, left_padded, no_eos,  # noqa: E402
                          padded_positions_and_mask,
                          ragged_cache_bytes)

VOCAB, HIDDEN, HEADS, INTERMEDIATE, BLOCK_SIZE = 256, 256, 4, 688, 512
HEAD_DIM = HIDDEN // HEADS
PRELUDE, CORE, CODA = 1, 2, 1
PAD, NEW_TOKENS, STEPS = 0, 48, (8, 16)
CONFIG = dict(n_embd=HIDDEN, n_heads=HEADS, intermediate_size=INTERMEDIATE, n_layers_in_prelude=PRELUDE,
              n_layers_in_recurrent_block=CORE, n_layers_in_coda=CODA, mean_recurrence=STEPS[0], vocab_size=VOCAB,
              padded_vocab_size=VOCAB, block_size=BLOCK_SIZE, init_values={"std": 0.0})
# num_steps -> {target fraction of num_steps: the kl threshold giving it} (mean steps of the new tokens,
# 16 prompts, 48 new tokens, greedy; `calibrate`)
THRESHOLDS = {8: {0.4: 0.422, 0.5: 0.368, 0.6: 0.331}, 16: {0.4: 0.267, 0.5: 0.221, 0.6: 0.173}}
RESULTS = HERE / "results" / "huginn_cpu.json"


def huginn_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """HuginnForCausalLM loaded from a checkpoint in the published format
    (write_huginn_checkpoint into a temporary folder), eval mode, no eos."""
    from act_kernels.hf import HuginnForCausalLM
    from tests.huginn.checkpoints import write_huginn_checkpoint

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        write_huginn_checkpoint(folder, seed=seed, dtype=dtype, **{**CONFIG, **overrides})
        model = HuginnForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    assert not model.initial_state(1, model.lm_head.weight).any(), "the benchmark's initial state is zeros (std 0)"
    return no_eos(model)


# -- the release's behaviour, dense ---------------------------------------------------------

def _rms_norm(norm, x: Tensor) -> Tensor:
    """x · rsqrt(mean(x²) + eps) · w, the statistics in float32 (float64 stays
    float64), as the release's RMSNorm."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype) * norm.weight


def _release_class():
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from act_kernels.hf import HuginnConfig

    class ReleaseHuginn(PreTrainedModel, GenerationMixin):
        """Huginn as its release runs a batch, dense: every row, every token
        (padding included) runs every one of num_steps steps; keys and values
        in a transformers cache at one slot per (step, layer). Built on a
        HuginnForCausalLM, whose modules it reads (the same parameters)."""

        config_class = HuginnConfig
        main_input_name = "input_ids"

        def __init__(self, ours):
            PreTrainedModel.__init__(self, copy.deepcopy(ours.config))
            self.transformer, self.lm_head = ours.transformer, ours.lm_head    # shared with ours: no copy
            self.generation_config = copy.deepcopy(ours.generation_config)
            std = float(self.config.init_values.get("std", 0.0))
            assert self.config.state_init == "zero" or not std > 0, "written for the zero initial state (std 0)"

        def get_input_embeddings(self):
            return self.transformer.wte

        def get_output_embeddings(self):
            return self.lm_head

        def _rope(self, positions: Tensor, dtype):
            """cos, sin (B, L, 1, hd/2) of position · base^(-2i/hd) (angles in float64, as ours)."""
            hd = self.config.n_embd // self.config.n_heads
            inv = self.config.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            angles = positions.to(torch.float64)[..., None, None] * inv
            return angles.cos().to(dtype), angles.sin().to(dtype)

        def _block(self, block, x, cos, sin, mask, cache, slot):
            """The release's SandwichBlock: x = n2(attn(n1 x) + x); x = n4(mlp(n3 x) + x)."""
            B, L, D = x.shape
            H = self.config.n_heads
            attn = block.attn
            q, k, v = attn.Wqkv(_rms_norm(block.norm_1, x)).view(B, L, 3, H, D // H).unbind(2)
            if attn.qk_bias is not None:
                q, k = q + attn.qk_bias[0], k + attn.qk_bias[1]
            # apply_rotary_emb_complex_like: q and k together, adjacent pairs rotated
            qk = torch.cat([q, k], 2).unflatten(-1, (-1, 2))
            qk = torch.stack([qk[..., 0] * cos - qk[..., 1] * sin, qk[..., 1] * cos + qk[..., 0] * sin], -1).flatten(3)
            q, k = qk.split(H, 2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, slot)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = _rms_norm(block.norm_2, attn.proj(y.transpose(1, 2).reshape(B, L, D)) + x)
            a, b = block.mlp.fc(_rms_norm(block.norm_3, x)).chunk(2, -1)
            return _rms_norm(block.norm_4, block.mlp.proj(F.silu(a) * b) + x)

        def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                    num_steps=None, logits_to_keep: int = 0, past_key_values=None, **kwargs):
            cache = cache if cache is not None else past_key_values   # transformers < 5.20 names it so (vLLM's env)
            c, t = self.config, self.transformer
            steps = c.mean_recurrence if num_steps is None else int(num_steps)
            B, L = input_ids.shape
            past = cache.get_seq_length() if cache is not None else 0
            position_ids, mask = padded_positions_and_mask(attention_mask, position_ids, B, L, past)
            x = t.wte(input_ids) * math.sqrt(c.n_embd)
            cos, sin = self._rope(position_ids, x.dtype)
            for i, block in enumerate(t.prelude):
                x = self._block(block, x, cos, sin, mask, cache, i)
            e, s = x, torch.zeros_like(x)                                    # std 0: the initial state is zeros
            P, K = len(t.prelude), len(t.core_block)
            for n in range(steps):                                           # every token, every step
                x = t.adapter(torch.cat([s, e], -1))
                for i, block in enumerate(t.core_block):
                    x = self._block(block, x, cos, sin, mask, cache, P + n * K + i)
                s = x
            x = _rms_norm(t.ln_f, s)
            for i, block in enumerate(t.coda):
                x = self._block(block, x, cos, sin, mask, cache, P + steps * K + i)
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            return CausalLMOutputWithPast(logits=self.lm_head(_rms_norm(t.ln_f, x[:, keep])), **{_CACHE: cache})

    return ReleaseHuginn


def release(ours):
    """The release's dense model over `ours`'s parameters."""
    return _release_class()(ours).eval()


# -- generation -------------------------------------------------------------------------------

def generate_ours(model, ids, mask, num_steps: int, threshold=None, new: int = NEW_TOKENS, schedule="depthwise"):
    """Greedy. threshold None: no exit, every token num_steps; else exit="kl" at threshold (depth-wise)."""
    exit = {} if threshold is None else dict(exit="kl", threshold=threshold)
    return model.generate(ids, mask, max_new_tokens=new, do_sample=False, num_steps=num_steps, schedule=schedule,
                          return_dict_in_generate=True, **exit)


def _cache_name() -> str:
    """What transformers calls the cache in generate and the model outputs:
    "cache" from 5.20 on, "past_key_values" before (vLLM's environment pins < 5.20)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


_CACHE = _cache_name()


def generate_release(dense, ids, mask, num_steps: int, new: int = NEW_TOKENS):
    """transformers' generate of the release: greedy, no eos, a DynamicCache
    (made empty: it grows a layer per slot, P + K N + C of them)."""
    from transformers import DynamicCache

    return dense.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None, num_steps=num_steps, return_dict_in_generate=True,
                          **{_CACHE: DynamicCache()})


def release_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def new_mean_steps(out, mask) -> float:
    """The new tokens' mean core steps."""
    return float(out.steps[:, mask.shape[1]:].double().mean())


def ideals(num_steps: int, mean: float) -> dict:
    """The ideal speed-ups over every token at num_steps for new tokens at `mean` steps."""
    full = PRELUDE + CODA + CORE * num_steps
    return dict(ideal=num_steps / mean, ideal_layers=full / (PRELUDE + CODA + CORE * mean),
                ideal_with_criterion_coda=full / (PRELUDE + (CORE + CODA) * mean))


# -- checks ----------------------------------------------------------------------------------

def check_release(model, dense, steps=STEPS, prompts: int = 3, new: int = 12, tol: float = 1e-4):
    """The release computes what ours does with no exit: logits on
    left-padded prompts (ours at num_steps, no exit), and greedy tokens of
    transformers' generate of the release against our no-exit generate under
    both schedules, at each num_steps. Returns a summary."""
    ids, mask = left_padded(prompts, 8, 40, seed=5)
    valid = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    summary = dict(prompts=prompts, prompt_tokens=int(valid.sum()), new_tokens=new)
    for n in steps:
        with torch.no_grad():
            ours = model(ids, mask, num_steps=n).logits
            theirs = dense(ids, attention_mask=mask, position_ids=positions, num_steps=n).logits
        torch.testing.assert_close(ours[valid], theirs[valid], rtol=tol, atol=tol)
        summary[f"max_abs_logit_diff_{n}"] = float((ours[valid] - theirs[valid]).abs().max())
        want = generate_release(dense, ids, mask, n, new).sequences
        for schedule in ("depthwise", "synchronous"):
            got = generate_ours(model, ids, mask, n, None, new, schedule=schedule)
            assert torch.equal(got.sequences, want), f"greedy tokens differ (num_steps {n}, {schedule})"
            assert bool((got.steps[:, ids.shape[1]:] == n).all())
        summary[f"greedy_tokens_equal_{n}"] = True
    return summary


def calibrate(model, num_steps: int, fraction: float, batch: int = 16, iters: int = 8):
    """The kl threshold whose generate (greedy, depth-wise) gives the new
    tokens a mean of about fraction · num_steps steps (bisection on log
    threshold: a larger threshold exits earlier). Returns (threshold, mean)."""
    ids, mask = left_padded(batch, 32, 128)
    low, high = math.log(1e-3), math.log(1.0)
    best = None
    for _ in range(iters):
        mid = (low + high) / 2
        mean = new_mean_steps(generate_ours(model, ids, mask, num_steps, math.exp(mid)), mask)
        if best is None or abs(mean - fraction * num_steps) < abs(best[1] - fraction * num_steps):
            best = (round(math.exp(mid), 3), mean)
        low, high = (low, mid) if mean < fraction * num_steps else (mid, high)
    return best


# -- cache bytes ----------------------------------------------------------------------------

def cache_bytes(model, dense, ids, mask, num_steps: int, threshold, new: int = NEW_TOKENS):
    """The keys and values held after generation: ours with the kl exits and
    ours with no exit (every token num_steps), in use and allocated
    (captured from model.new_cache, as hf_workloads.capture_caches does);
    the release's DynamicCache (P + K N + C slots of every position fed,
    padding included), and without its padding."""
    capture_caches(model)
    try:
        out = generate_ours(model, ids, mask, num_steps, threshold, new)
        kl_used, kl_alloc = ragged_cache_bytes(model.captured_caches)
        generate_ours(model, ids, mask, num_steps, None, new)
        fixed_used, fixed_alloc = ragged_cache_bytes(model.captured_caches)
    finally:
        del model.new_cache, model.captured_caches
    theirs = dynamic_cache_bytes(release_cache(generate_release(dense, ids, mask, num_steps, new)))
    batch = ids.shape[0]
    valid = torch.cat([mask.bool(), torch.ones(batch, new, dtype=torch.bool)], 1)
    fed = int(valid.sum()) - batch                  # the last new token is never fed
    row = 2 * HIDDEN * model.lm_head.weight.element_size()
    return dict(num_steps=num_steps, threshold=threshold, batch=batch, new_tokens=new, tokens=int(valid.sum()),
                new_mean_steps=new_mean_steps(out, mask), kl_bytes=kl_used, kl_allocated_bytes=kl_alloc,
                fixed_bytes=fixed_used, fixed_allocated_bytes=fixed_alloc, release_bytes=theirs,
                release_unpadded_bytes=(PRELUDE + CORE * num_steps + CODA) * fed * row)


# -- main -------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=HERE,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _option(argv, name, default):
    if name in argv:
        at = argv.index(name)
        value = argv[at + 1]
        del argv[at:at + 2]
        return value
    return default


def main(argv):
    """python bench/huginn_workloads.py [--cpu-time] [--steps 8,16] [--fractions 0.5] [--calibrate] [BATCH ...]
    (batches 1 16 by default; 64 by asking): per num_steps and batch, the
    release, ours with no exit (depth-wise and synchronous) and ours with
    exit="kl" at the thresholds of the fractions timed in alternation (one
    thread; 5 rounds, 3 at batch 64, medians), a line per case; the figures
    to bench/results/huginn_cpu.json. --calibrate: find the thresholds first
    (bisection, batch 16). --cpu-time times with the process's CPU time."""
    torch.set_num_threads(1)
    argv = list(argv)
    cpu_time = "--cpu-time" in argv
    timer = time.process_time if cpu_time else time.perf_counter
    do_calibrate = "--calibrate" in argv
    argv = [a for a in argv if a not in ("--cpu-time", "--calibrate")]
    steps_list = [int(n) for n in _option(argv, "--steps", ",".join(map(str, STEPS))).split(",")]
    fractions = [float(f) for f in _option(argv, "--fractions", "0.5").split(",")]
    batches = [int(b) for b in argv] or [1, 16]
    model = huginn_model()
    dense = release(model)
    thresholds = {n: dict(THRESHOLDS.get(n, {})) for n in steps_list}
    if do_calibrate:
        for n in steps_list:
            for f in fractions:
                thr, mean = calibrate(model, n, f)
                thresholds[n][f] = thr
                print(f"calibrate num_steps {n}, {f:.0%} of it: threshold {thr} (mean steps of new tokens {mean:.2f})")
    check = check_release(model, dense, steps_list)
    print("check:", check)
    rows, caches = [], []
    for n in steps_list:
        for batch in batches:
            ids, mask = left_padded(batch, 32, 128)
            cases = {"release": lambda: generate_release(dense, ids, mask, n),
                     "fixed_depthwise": lambda: generate_ours(model, ids, mask, n),
                     "fixed_synchronous": lambda: generate_ours(model, ids, mask, n, schedule="synchronous")}
            for f in fractions:
                t = thresholds[n][f]
                cases[f"kl {t}"] = lambda t=t: generate_ours(model, ids, mask, n, t)
            med = interleaved(cases, rounds=5 if batch <= 16 else 3, timer=timer)
            rate = {name: batch * NEW_TOKENS / s for name, s in med.items()}
            common = dict(num_steps=n, batch=batch, new_tokens=NEW_TOKENS, prompt_tokens=int(mask.sum()),
                          timer="process_time" if cpu_time else "perf_counter")
            print(f"num_steps {n}, batch {batch}, {NEW_TOKENS} new: release {rate['release']:.0f} tok/s; no exit "
                  f"depthwise {rate['fixed_depthwise']:.0f} tok/s ({med['release'] / med['fixed_depthwise']:.2f}x "
                  f"release), synchronous {rate['fixed_synchronous']:.0f} tok/s "
                  f"({med['release'] / med['fixed_synchronous']:.2f}x release); ideal 1.00x")
            for name in ("release", "fixed_depthwise", "fixed_synchronous"):
                rows.append(dict(name=name, median_s=med[name], tokens_per_s=rate[name],
                                 speedup_vs_release=med["release"] / med[name], mean_steps_new=float(n), **common))
            no_exit = generate_ours(model, ids, mask, n).iterations
            for f in fractions:
                t = thresholds[n][f]
                out = generate_ours(model, ids, mask, n, t)
                mean = new_mean_steps(out, mask)
                best = ideals(n, mean)
                kl = med[f"kl {t}"]
                deepest = float(out.steps[:, mask.shape[1]:].double().mean(1).max())
                line = [f"  kl {t} (mean steps of new tokens {mean:.2f} = {mean / n:.0%} of {n}; the deepest row's "
                        f"{deepest:.2f}): {rate[f'kl {t}']:.0f} tok/s"]
                row = dict(name="kl", threshold=t, target_fraction=f, median_s=kl, tokens_per_s=rate[f"kl {t}"],
                           mean_steps_new=mean, deepest_row_mean_steps=deepest, iterations=out.iterations,
                           iterations_no_exit=no_exit, iteration_ideal=no_exit / out.iterations, **best, **common)
                for base in ("release", "fixed_depthwise", "fixed_synchronous"):
                    speed = med[base] / kl
                    row[f"speedup_vs_{base}"] = speed
                    line.append(f"{speed:.2f}x {base} ({100 * speed / best['ideal']:.0f} % of {best['ideal']:.2f}x; "
                                f"{100 * speed / best['ideal_layers']:.0f} % of {best['ideal_layers']:.2f}x with P+C)")
                line.append(f"ideal with the criterion's coda at every step {best['ideal_with_criterion_coda']:.2f}x; block "
                            f"iterations {out.iterations} against {no_exit} with no exit (depth-wise floor "
                            f"{no_exit / out.iterations:.2f}x: the deepest row sets it)")
                print("; ".join(line))
                rows.append(row)
            if batch == max(batches):
                t = thresholds[n][fractions[0]]
                c = cache_bytes(model, dense, ids, mask, n, t)
                caches.append(c)
                mib = 2 ** 20
                print(f"  cache after generation (kl {t}, mean steps of new tokens {c['new_mean_steps']:.2f}): ours "
                      f"{c['kl_bytes'] / mib:.1f} MiB in use ({c['kl_allocated_bytes'] / mib:.1f} allocated), ours no "
                      f"exit {c['fixed_bytes'] / mib:.1f} MiB, release DynamicCache {c['release_bytes'] / mib:.1f} MiB "
                      f"({c['release_bytes'] / c['kl_bytes']:.2f}x ours; {c['release_unpadded_bytes'] / mib:.1f} MiB "
                      f"without its padding, {c['release_unpadded_bytes'] / c['kl_bytes']:.2f}x)")
    import transformers
    result = dict(device=f"cpu-{platform.machine()}", date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), commit=_commit(), threads=torch.get_num_threads(),
        model=dict(CONFIG, head_dim=HEAD_DIM, initial_state="zeros (init_values.std 0)"), thresholds={
            str(n): {str(f): t for f, t in v.items()} for n, v in thresholds.items()}, check=check, rows=rows,
        cache_bytes=caches)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {RESULTS}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
