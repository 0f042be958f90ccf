"""The Ouro workloads of bench/test_bench_ouro.py: a tiny Ouro (ByteDance's
looped LM: the whole decoder stack looped total_ut_steps times, sandwich
norms, the model norm after every loop, the exit gate
`model.early_exit_gate`) as `act_kernels.hf.OuroForCausalLM`, loaded from a
checkpoint in the published format (tests/ouro/checkpoints.py), and the
baseline a user runs today: the release's behaviour, written here from its
math as a dense model (`ReleaseOuro`) run through transformers' own
`generate` with a DynamicCache.

The model: hidden 256, grouped-query attention 4 / 2 heads of 64,
intermediate 688, 4 layers, byte vocabulary (256), total_ut_steps 4. Its
exit gate keeps the checkpoint's random weights (std 2 / sqrt(hidden)) with
bias 0: λ then varies from token to token, and the gate's threshold sets
the mean exit loop (`THRESHOLDS`: the thresholds that give mean exits of
about 1.5, 2.5 and 3.5 over the tokens processed when generating for 16
prompts; `calibrate` finds them again).

The release (`ReleaseOuro`): every loop for every token, the cache one
DynamicCache slot per (loop, layer) = loop * num_layers + layer, the model
norm after every loop, the gate read on every loop's normed state, the exit
pdf p_t = λ_t Π_{j<t}(1 − λ_j) (the last loop takes the rest), each token's
exit the first loop whose cumulative p reaches the threshold (the last if
none), and the head on that loop's normed state; attention by torch's
scaled_dot_product_attention, the keys and values repeated to the query
heads (transformers' repeat_kv). Positions count from each row's first real
token (transformers' generate gives them from the attention mask). It reads
the OuroForCausalLM's own parameters (no copy). `check_release` checks that
its logits equal ours with the exit off, that its exits and logits at a
threshold equal ours with every_loop=True, and that its greedy tokens and
their exits equal our `every_loop=True` generate under both schedules (to
1e-4 in float32; in float64, `ouro_model(dtype=torch.float64)`, to 1e-10).

Generation: 48 new tokens for left-padded prompts of 32..128 bytes. Ours
depth-wise with the gate's exits (the skipped loops skipped) against (a) the
release, (b) our every-loop path (`every_loop=True`, the same threshold:
every loop computed, the exit picked afterwards) and (c) our exit="fixed"
(every token every loop). Ideal: the loops every token runs in (a)-(c), 4,
over the mean exit loop of the tokens processed (the prompts' real tokens
and the new ones; the release also runs the prompts' padding, ours never
does). Greedy decoding everywhere (the release's cost does not depend on
the tokens; ours does, through the exits, which `.steps` reports).

    OMP_NUM_THREADS=1 python bench/ouro_workloads.py [--cpu-time] [--exits 1.5,2.5,3.5] [BATCH ...]
"""
from __future__ import annotations

import copy
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

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 256, 256, 688, 4, 2, 64
LAYERS, LOOPS, PAD, NEW_TOKENS = 4, 4, 0, 48
# gate thresholds -> the mean exit loop they give (tokens processed, 16 prompts, 48 new tokens; `calibrate`)
THRESHOLDS = {1.5: 0.23, 2.5: 0.68, 3.5: 0.95}
CONFIG = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, total_ut_steps=LOOPS,
              max_position_embeddings=512)


def ouro_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """OuroForCausalLM loaded from a checkpoint in the published format
    (write_ouro_checkpoint into a temporary folder), eval mode, no eos; the
    exit gate: the checkpoint's random weights, bias 0."""
    from act_kernels.hf import OuroForCausalLM
    from tests.ouro.checkpoints import write_ouro_checkpoint

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # transformers on the published null rope_scaling
        write_ouro_checkpoint(folder, seed=seed, dtype=dtype, **{**CONFIG, **overrides})
        model = OuroForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        model.model.early_exit_gate.bias.zero_()
    return no_eos(model)


# -- the release's behaviour, dense ---------------------------------------------------------

def _rms_norm(norm, x: Tensor) -> Tensor:
    """w · x / sqrt(mean(x²) + eps), the statistics in float32 as the release's
    OuroRMSNorm (float64 stays float64, as ours, for an exact check)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _release_class():
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from act_kernels.hf import OuroConfig

    class ReleaseOuro(PreTrainedModel, GenerationMixin):
        """Ouro as its release runs it, dense: every loop of every layer for
        every token (padding included), keys and values in a transformers
        cache at slot loop * num_layers + layer, the head on each token's exit
        loop. Built on an OuroForCausalLM, whose modules it reads (the same
        parameters). forward(..., exit_threshold=t): each token's exit is the
        first loop whose cumulative exit probability reaches t (the last if
        none); None: the last loop (exit off). `.exits` holds the last call's
        exit loops (1-based) of the positions it returned logits for; with
        `.exit_log` a list, every call appends them to it."""

        config_class = OuroConfig
        main_input_name = "input_ids"

        def __init__(self, ours):
            PreTrainedModel.__init__(self, copy.deepcopy(ours.config))
            self.model, self.lm_head = ours.model, ours.lm_head      # modules shared with ours: no copy
            self.generation_config = copy.deepcopy(ours.generation_config)
            self.exits, self.exit_log = None, None

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        def _rope(self, positions: Tensor, dtype):
            """cos, sin (B, 1, L, head_dim), rotate_half layout; the angles in
            float64 as ours (the release's in float32: a rounding apart)."""
            hd = self.config.head_dim
            inv_freq = self.config.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            angles = positions.to(torch.float64)[..., None] * inv_freq
            angles = torch.cat([angles, angles], -1)[:, None]          # (B, 1, L, hd)
            return angles.cos().to(dtype), angles.sin().to(dtype)

        def _layer(self, layer, x, cos, sin, mask, cache, slot):
            c = self.config
            B, L, _ = x.shape
            attn = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            q = attn.q_proj(h).view(B, L, c.num_attention_heads, c.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, L, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, L, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(k, v, slot)
            group = c.num_attention_heads // c.num_key_value_heads
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.head_dim ** -0.5)
            o = attn.o_proj(o.transpose(1, 2).reshape(B, L, c.num_attention_heads * c.head_dim))
            x = x + _rms_norm(layer.input_layernorm_2, o)
            mlp = layer.mlp
            h = _rms_norm(layer.post_attention_layernorm, x)
            h = mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
            return x + _rms_norm(layer.post_attention_layernorm_2, h)

        def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                    logits_to_keep: int = 0, exit_threshold=None, **kwargs):
            B, L = input_ids.shape
            past = cache.get_seq_length() if cache is not None else 0
            position_ids, mask = padded_positions_and_mask(attention_mask, position_ids, B, L, past)
            x = self.model.embed_tokens(input_ids)
            cos, sin = self._rope(position_ids, x.dtype)
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            states, gates = [], []
            n = len(self.model.layers)
            for loop in range(self.config.total_ut_steps):
                for i, layer in enumerate(self.model.layers):
                    x = self._layer(layer, x, cos, sin, mask, cache, loop * n + i)
                x = _rms_norm(self.model.norm, x)
                states.append(x[:, keep])
                gates.append(self.model.early_exit_gate(x).squeeze(-1))       # every position, every loop
            exit = self._exit_loops(gates, exit_threshold)[:, keep]           # (B, L') 0-based
            stacked = torch.stack(states, 2)                                  # (B, L', T, D)
            picked = stacked.gather(2, exit[..., None, None].expand(-1, -1, 1, stacked.shape[-1])).squeeze(2)
            self.exits = exit + 1
            if self.exit_log is not None:
                self.exit_log.append(self.exits)
            return CausalLMOutputWithPast(logits=self.lm_head(picked), cache=cache)

        @staticmethod
        def _exit_loops(gates, threshold) -> Tensor:
            T = len(gates)
            if threshold is None:
                return torch.full(gates[0].shape, T - 1, dtype=torch.int64)
            remaining, pdf = torch.ones_like(gates[0]), []
            for t, g in enumerate(gates):
                lam = torch.sigmoid(g)
                pdf.append(lam * remaining if t < T - 1 else remaining)
                remaining = remaining * (1 - lam)
            reached = torch.stack(pdf, -1).cumsum(-1) >= threshold
            return torch.where(reached.any(-1), reached.float().argmax(-1), torch.full_like(reached[..., 0], T - 1,
                                                                                            dtype=torch.int64))

    return ReleaseOuro


def release(ours):
    """The release's dense model over `ours`'s parameters."""
    return _release_class()(ours).eval()


# -- generation -------------------------------------------------------------------------------


def generate_ours(model, ids, mask, mode: str, threshold=None, new: int = NEW_TOKENS, schedule="depthwise"):
    """Greedy. mode gate: the gate's exits at threshold, the later loops skipped;
    every_loop: every loop computed, the exit picked at threshold; fixed: every token every loop."""
    exit = dict(gate=dict(threshold=threshold), every_loop=dict(threshold=threshold, every_loop=True),
                fixed=dict(exit="fixed"))[mode]
    return model.generate(ids, mask, max_new_tokens=new, do_sample=False, schedule=schedule,
                          return_dict_in_generate=True, **exit)


def generate_release(dense, ids, mask, threshold, new: int = NEW_TOKENS):
    """transformers' generate of the release: greedy, no eos, a DynamicCache
    (lazily one layer per slot: a DynamicCache made from the config has
    num_hidden_layers slots, too few for loop * num_layers + layer)."""
    from transformers import DynamicCache

    return dense.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None, cache=DynamicCache(), exit_threshold=threshold,
                          return_dict_in_generate=True)


def release_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def processed(out, mask, new: int = NEW_TOKENS):
    """(tokens processed, their summed exit loops, the new tokens' mean exit):
    the prompts' real tokens and the new ones."""
    batch, width = mask.shape
    valid = torch.cat([mask.bool(), torch.ones(batch, new, dtype=torch.bool)], 1)
    steps = out.steps[valid]
    return int(valid.sum()), int(steps.sum()), float(out.steps[:, width:].double().mean())


def ideal(tokens: int, exits_sum: int) -> float:
    """Loops every token runs in the baselines (LOOPS) over the mean exit loop."""
    return LOOPS * tokens / exits_sum


# -- checks ----------------------------------------------------------------------------------

def check_release(model, dense, threshold: float = THRESHOLDS[2.5], prompts: int = 3, new: int = 12,
                  tol: float = 1e-4):
    """The release computes what ours does: logits with the exit off (every
    loop; ours exit="fixed") on left-padded prompts, its exits and logits
    at `threshold` against ours with every_loop=True, and its greedy tokens
    and their exits against our every-loop generate (both schedules).
    Returns a summary."""
    ids, mask = left_padded(prompts, 8, 40, seed=5)
    valid = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours_off = model(ids, mask, exit="fixed")
        theirs_off = dense(ids, attention_mask=mask, position_ids=positions).logits
        off = float((ours_off.logits[valid] - theirs_off[valid]).abs().max())
        torch.testing.assert_close(ours_off.logits[valid], theirs_off[valid], rtol=tol, atol=tol)
        ours_at = model(ids, mask, threshold=threshold, every_loop=True)
        theirs_at = dense(ids, attention_mask=mask, position_ids=positions, exit_threshold=threshold).logits
        assert torch.equal(ours_at.steps[valid], dense.exits[valid]), "the exits differ"
        torch.testing.assert_close(ours_at.logits[valid], theirs_at[valid], rtol=tol, atol=tol)
    dense.exit_log = []
    try:
        theirs = generate_release(dense, ids, mask, threshold, new).sequences
        # call k read the exit of position width - 1 + k: the last prompt token's, then each new token's
        their_exits = torch.cat(dense.exit_log, 1)[:, :new]
    finally:
        dense.exit_log = None
    width = ids.shape[1]
    for schedule in ("depthwise", "synchronous"):
        ours = generate_ours(model, ids, mask, "every_loop", threshold, new, schedule=schedule)
        assert torch.equal(ours.sequences, theirs), f"greedy tokens differ ({schedule})"
        assert torch.equal(ours.steps[:, width - 1:width - 1 + new], their_exits), f"exits differ ({schedule})"
    exits = ours_at.steps[valid].double()
    return dict(threshold=threshold, prompts=prompts, prompt_tokens=int(valid.sum()), new_tokens=new,
                max_abs_logit_diff_exit_off=off, prompt_mean_exit=round(float(exits.mean()), 2))


def calibrate(model, target: float, batch: int = 16, iters: int = 12):
    """The gate threshold whose generate (greedy, depth-wise) gives a mean exit
    loop nearest `target` over the tokens processed (bisection)."""
    ids, mask = left_padded(batch, 32, 128)
    low, high = 1e-3, 1.0
    for _ in range(iters):
        mid = (low + high) / 2
        tokens, exits, _ = processed(generate_ours(model, ids, mask, "gate", mid), mask)
        low, high = (mid, high) if exits / tokens < target else (low, mid)
    return (low + high) / 2


# -- cache bytes ----------------------------------------------------------------------------

def cache_bytes(model, dense, ids, mask, threshold, new: int = NEW_TOKENS):
    """The keys and values held after generation: ours with the gate's exits
    and ours with every loop (exit fixed), in use and allocated; the
    release's DynamicCache, and without its padding. Rows: ours N + 1 per
    token at the first layer, N at the others (every token, the last new
    one included); every loop 5 and 4; the release 4 x 4 per position fed
    (the padding included, the last new token not)."""
    capture_caches(model)
    try:
        out = generate_ours(model, ids, mask, "gate", threshold, new)
        gate_used, gate_alloc = ragged_cache_bytes(model.captured_caches)
        gate_rows = sum(sum(c.rows()) for c in model.captured_caches)
        generate_ours(model, ids, mask, "fixed", None, new)
        fixed_used, fixed_alloc = ragged_cache_bytes(model.captured_caches)
        fixed_rows = sum(sum(c.rows()) for c in model.captured_caches)
    finally:
        del model.new_cache, model.captured_caches
    theirs = dynamic_cache_bytes(release_cache(generate_release(dense, ids, mask, threshold, new)))
    batch = ids.shape[0]
    tokens, exits, _ = processed(out, mask, new)
    fed = tokens - batch                          # the last new token is never fed
    row = 2 * KV_HEADS * HEAD_DIM * model.lm_head.weight.element_size()
    return dict(tokens=tokens, exits=exits, mean_exit=exits / tokens, row_bytes=row, gate_rows=gate_rows,
                gate_bytes=gate_used, gate_allocated_bytes=gate_alloc, fixed_rows=fixed_rows, fixed_bytes=fixed_used,
                fixed_allocated_bytes=fixed_alloc, release_bytes=theirs, release_unpadded_bytes=LOOPS * LAYERS * fed * row)


# -- main -------------------------------------------------------------------------------------

def main(argv):
    """python bench/ouro_workloads.py [--cpu-time] [--exits 1.5,2.5,3.5] [BATCH ...]
    (batches 1 16 64 by default): the comparisons timed in alternation (one
    thread; 5 rounds, 3 at batch 64, medians), a line per batch and mean exit;
    --cpu-time times with the process's CPU time (time.process_time)."""
    torch.set_num_threads(1)
    timer = time.process_time if "--cpu-time" in argv else time.perf_counter
    argv = [a for a in argv if a != "--cpu-time"]
    targets = list(THRESHOLDS)
    if "--exits" in argv:
        at = argv.index("--exits")
        targets = [float(t) for t in argv[at + 1].split(",")]
        del argv[at:at + 2]
    model = ouro_model()
    dense = release(model)
    for target in targets:
        print("check:", check_release(model, dense, THRESHOLDS[target]))
    for batch in (int(b) for b in argv or ["1", "16", "64"]):
        ids, mask = left_padded(batch, 32, 128)
        # the release's cost does not depend on its threshold (every loop runs, the head reads one): timed once
        cases = {"release": lambda: generate_release(dense, ids, mask, None),
                 "fixed": lambda: generate_ours(model, ids, mask, "fixed")}
        for target in targets:
            t = THRESHOLDS[target]
            cases[f"gate {t}"] = lambda t=t: generate_ours(model, ids, mask, "gate", t)
            cases[f"every_loop {t}"] = lambda t=t: generate_ours(model, ids, mask, "every_loop", t)
        med = interleaved(cases, rounds=5 if batch <= 16 else 3, timer=timer)
        rate = {name: batch * NEW_TOKENS / s for name, s in med.items()}
        print(f"generate batch {batch}, {NEW_TOKENS} new: release {rate['release']:.0f} tok/s, every loop (exit "
              f"fixed) {rate['fixed']:.0f} tok/s ({med['release'] / med['fixed']:.2f}x release, ideal 1.00x)")
        for target in targets:
            t = THRESHOLDS[target]
            tokens, exits, new_mean = processed(generate_ours(model, ids, mask, "gate", t), mask)
            best = ideal(tokens, exits)
            gate, every = med[f"gate {t}"], med[f"every_loop {t}"]
            line = [f"  threshold {t} (mean exit {exits / tokens:.2f}, new tokens {new_mean:.2f}): gate "
                    f"{rate[f'gate {t}']:.0f} tok/s"]
            for name, base in (("release", med["release"]), ("every_loop", every), ("fixed", med["fixed"])):
                speed = base / gate
                line.append(f"{speed:.2f}x {name} ({100 * speed / best:.0f} % of {best:.2f}x)")
            line.append(f"every_loop {rate[f'every_loop {t}']:.0f} tok/s ({med['release'] / every:.2f}x release)")
            print("; ".join(line))
        t = THRESHOLDS[targets[len(targets) // 2]]
        c = cache_bytes(model, dense, ids, mask, t)
        mib = 2 ** 20
        print(f"  cache after generation (threshold {t}, mean exit {c['mean_exit']:.2f}): gate "
              f"{c['gate_bytes'] / mib:.1f} MiB in use ({c['gate_allocated_bytes'] / mib:.1f} allocated), every "
              f"loop {c['fixed_bytes'] / mib:.1f} MiB ({c['fixed_bytes'] / c['gate_bytes']:.2f}x), DynamicCache "
              f"{c['release_bytes'] / mib:.1f} MiB ({c['release_bytes'] / c['gate_bytes']:.2f}x; "
              f"{c['release_unpadded_bytes'] / mib:.1f} MiB without its padding)")


if __name__ == "__main__":
    main(sys.argv[1:])
