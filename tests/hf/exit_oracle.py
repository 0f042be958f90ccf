"""An independent dense oracle for per-token exit rules at inference over
transformers' own decoder layers (design §9, §14, §16). Plain PyTorch and
transformers' layer modules; it shares no code with act_kernels (it takes
positions, the additive mask and the scoped attention switch from
tests/hf/oracle.py).

The model: embed -> prelude layers [0, start) once -> the block [start, stop)
applied per token for n = 1..N (N its exit step, 1 <= N <= M) -> coda layers
[stop, L) once, on every token's exit state -> final norm -> lm_head (no final
norm when step_norm and there is no coda: the state went through it at every
step, as in Ouro).

    s^0 = prelude output;  s^n = block(s^{n-1}), then final norm if step_norm
    (s^n is the state after the norm: what the rules read and what a token
    outputs).

Exit rules (steps count from 1; a token exits after step N; every token at
most M = max_steps; a token that reaches M exits there whatever the rule):

    gate    lam_n = sigmoid(w . s^n + c) (float64 for float64 models, else
            float32); p_n = lam_n prod_{j<n} (1 - lam_j), summed step by step:
            c_n = p_1 + .. + p_n. N = first n >= min_steps with c_n >= threshold
            (ties exit), else M (p_M = 1 - c_{M-1}, so c_M = 1).
    latent  r_n = ||s^n - s^{n-1}|| / ||s^n|| (L2 over the hidden dim, in the
            accumulation dtype). N = first n >= max(2, min_steps) with
            r_n < threshold (strictly; a tie runs on), else M.
    kl      P_n = softmax(head(norm(coda(s^n)))) for the token being decoded,
            KL_n = sum P_n (log P_n - log P_{n-1}). N = first n >=
            max(2, min_steps) with KL_n < threshold (strictly), else M.
    fixed   N = M.

The frozen-token rule: a token that exited freezes. Token i at step n reads an
earlier token j through, at the block's first layer, the keys and values of
s_j^{min(n-1, N_j)}, and at block layer k > 1 through j's input to layer k at
its step min(n, N_j). The dense evaluation: every step runs every token of the
padded batch through the block; the first layer reads the visible states
(v_j = s_j^n while j runs, then frozen at s_j^{N_j}); a later layer reads, for
a token that has exited, its stored input to that layer at its last step.

`pick_after_every_loop` is the reference without freezing (Ouro's code,
vLLM): every token runs all M loops of the plain unrolled model, the rule
picks each token's N from its own trajectory s^1..s^M, and the coda reads
s^N.

`kl_decode_oracle` evaluates a sequence token by token, as decoding does:
prompt tokens run exactly prefill_steps each, every later token alone, with
every earlier token final; at each of its steps the coda and head run on
[earlier tokens' exit states, this token's s^n] to evaluate the rule.
`token_by_token` is the same evaluation for any rule (a second, independent
implementation of the frozen rule: the batched one must equal it).

Padding: positions count each row's real tokens 0, 1, 2.. from its first real
token; padding never reaches a real token; logits 0 and steps 0 there.
Attention: "sdpa" by default (exact in float64; eager rounds its softmax to
float32).
"""
import torch

from hf.oracle import attn_implementation, causal_mask, positions

RULES = ("gate", "latent", "fixed", "kl")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class ExitRule:
    """Per-token exit decisions for one trajectory at a time (any batch shape).
    `exits(n, state, logprobs=None)` is called once per step n = 1, 2, ..
    with the token's s^n (and, for kl, its log P_n); returns the bool mask of
    tokens whose rule says exit after step n (n == M always exits). The
    caller ignores the answer for tokens that already exited. `trace` keeps
    each step's statistic (c_n, r_n or KL_n; NaN where not evaluated)."""

    def __init__(self, rule, *, threshold, min_steps, max_steps, halting=None):
        assert rule in RULES, rule
        assert 1 <= min_steps <= max_steps, (min_steps, max_steps)
        if rule == "gate":
            assert halting is not None
        self.rule, self.threshold, self.min_steps, self.max_steps = rule, threshold, min_steps, max_steps
        self.halting = halting
        self.cdf = self.survive = self.prev = None
        self.trace = []

    def exits(self, n, state, logprobs=None):
        acc = _acc(state.dtype)
        shape = state.shape[:-1]
        last = torch.full(shape, n == self.max_steps, dtype=torch.bool, device=state.device)
        stat = torch.full(shape, float("nan"), dtype=acc, device=state.device)
        if self.rule == "fixed":
            self.trace.append(stat)
            return last
        if self.rule == "gate":
            lam = torch.sigmoid(self.halting(state.to(self.halting.weight.dtype)).squeeze(-1).to(acc))
            if self.cdf is None:
                self.cdf = torch.zeros(shape, dtype=acc, device=state.device)
                self.survive = torch.ones_like(self.cdf)
            p = lam * self.survive if n < self.max_steps else 1 - self.cdf
            self.cdf = self.cdf + p
            self.survive = self.survive * (1 - lam)
            self.trace.append(self.cdf)
            return last | ((n >= self.min_steps) & (self.cdf >= self.threshold))
        current = state.to(acc) if self.rule == "latent" else logprobs.to(acc)
        prev, self.prev = self.prev, current
        if n < max(2, self.min_steps):
            self.trace.append(stat)
            return last
        if self.rule == "latent":
            stat = torch.linalg.vector_norm(current - prev, dim=-1) / torch.linalg.vector_norm(current, dim=-1)
        else:
            stat = (current.exp() * (current - prev)).sum(-1)
        self.trace.append(stat)
        return last | (stat < self.threshold)


class _Model:
    """The pieces of a transformers causal LM for one padded batch."""

    def __init__(self, model, block, input_ids, attention_mask):
        self.model, self.inner = model, model.model
        self.layers = list(self.inner.layers)
        self.start, self.stop = block
        assert 0 <= self.start < self.stop <= len(self.layers)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.real = attention_mask.bool()
        self.pos = positions(attention_mask)
        self.embedded = self.inner.embed_tokens(input_ids)
        self.dtype = self.embedded.dtype
        self.mask = causal_mask(attention_mask, self.dtype)
        self.rope = self.inner.rotary_emb(self.embedded, self.pos)

    def apply(self, layer, x):
        out = layer(x, attention_mask=self.mask, position_ids=self.pos, position_embeddings=self.rope)
        return out[0] if isinstance(out, tuple) else out

    @property
    def block(self):
        return self.layers[self.start:self.stop]

    def prelude(self):
        x = self.embedded
        for layer in self.layers[:self.start]:
            x = self.apply(layer, x)
        return x

    def head(self, hidden, step_norm):
        for layer in self.layers[self.stop:]:
            hidden = self.apply(layer, hidden)
        if not (step_norm and self.stop == len(self.layers)):
            hidden = self.inner.norm(hidden)
        return self.model.lm_head(hidden)

    def finish(self, states, steps, step_norm):
        logits = self.head(states, step_norm)
        zero = ~self.real
        return logits.masked_fill(zero[..., None], 0), steps.masked_fill(zero, 0)


def frozen_loop(model, block, decide, *, max_steps, step_norm=False, input_ids, attention_mask=None, attn="sdpa"):
    """The frozen-token evaluation with any decision: decide(n, s^n) -> bool
    (B, L), exit after step n (n == max_steps always exits). Returns
    (logits (B, L, V), steps (B, L), record) with record = {"x0", "states":
    [s^1..] whole (B, L, D) per step (meaningless for a token after its exit),
    "exit_states" (B, L, D)}."""
    m = _Model(model, block, input_ids, attention_mask)
    with attn_implementation(model, attn):
        x0 = m.prelude()
        visible, stored = x0, [None] * len(m.block)
        running = m.real.clone()
        steps = torch.zeros(m.real.shape, dtype=torch.long)
        out = torch.zeros_like(x0)
        record = {"x0": x0, "states": []}
        for n in range(1, max_steps + 1):
            y = visible
            for k, layer in enumerate(m.block):
                if k > 0:
                    stored[k] = y if stored[k] is None else torch.where(running[..., None], y, stored[k])
                    y = stored[k]
                y = m.apply(layer, y)
            if step_norm:
                y = m.inner.norm(y)
            record["states"].append(y)
            now = running & (decide(n, y) | (n == max_steps))
            out = torch.where(now[..., None], y, out)
            steps = torch.where(now, n, steps)
            visible = torch.where(running[..., None], y, visible)
            running = running & ~now
            if not bool(running.any()):
                break
        record["exit_states"] = out
        logits, steps = m.finish(out, steps, step_norm)
    return logits, steps, record


def exit_oracle(model, block, halting, *, rule, threshold, min_steps=1, max_steps, step_norm=False, input_ids,
                attention_mask=None, attn="sdpa", debug=False):
    """Per-token exits with frozen tokens, rules gate / latent / fixed.
    Returns (logits (B, L, V), steps (B, L) int64), 0 at padding; with
    debug=True also frozen_loop's record plus "trace" (the rule's statistic
    per step)."""
    assert rule in ("gate", "latent", "fixed"), rule
    decider = ExitRule(rule, threshold=threshold, min_steps=min_steps, max_steps=max_steps, halting=halting)
    logits, steps, record = frozen_loop(model, block, decider.exits, max_steps=max_steps, step_norm=step_norm,
                                        input_ids=input_ids, attention_mask=attention_mask, attn=attn)
    record["trace"] = decider.trace
    return (logits, steps, record) if debug else (logits, steps)


def pick_after_every_loop(model, block, halting, *, rule, threshold, min_steps=1, max_steps, step_norm=False,
                          input_ids, attention_mask=None, attn="sdpa", debug=False):
    """Every token through all M loops of the unrolled model (no freezing),
    each token's N picked by the rule from its own trajectory, the coda on
    s^N. Returns (logits, steps) as exit_oracle (debug: a record with
    "states", "exit_states", "trace")."""
    assert rule in ("gate", "latent", "fixed"), rule
    decider = ExitRule(rule, threshold=threshold, min_steps=min_steps, max_steps=max_steps, halting=halting)
    m = _Model(model, block, input_ids, attention_mask)
    with attn_implementation(model, attn):
        y = x0 = m.prelude()
        steps = torch.zeros(m.real.shape, dtype=torch.long)
        out = torch.zeros_like(x0)
        record = {"x0": x0, "states": []}
        for n in range(1, max_steps + 1):
            for layer in m.block:
                y = m.apply(layer, y)
            if step_norm:
                y = m.inner.norm(y)
            record["states"].append(y)
            now = (steps == 0) & decider.exits(n, y)
            out = torch.where(now[..., None], y, out)
            steps = torch.where(now, n, steps)
        record["exit_states"], record["trace"] = out, decider.trace
        logits, steps = m.finish(out, steps, step_norm)
    return (logits, steps, record) if debug else (logits, steps)


def token_by_token(model, block, halting=None, *, rule, threshold, min_steps=1, max_steps, prompt_length=0,
                   prefill_steps=None, step_norm=False, sequence, attn="sdpa", debug=False):
    """One unpadded sequence (1-D ids) evaluated token by token: tokens
    [0, prompt_length) run exactly prefill_steps each, every later token runs
    `rule` alone, every earlier token final. Token i at step n, block layer k,
    is the layer applied to the rows [j's input to k as the frozen rule reads
    it, for j < i] + [i's own input], its last row. For kl the coda and head
    run at each step on [exit states of tokens < i] + [s_i^n]. Returns
    (logits (L, V), steps (L,)); debug: also {"states": per token [s^0..s^N],
    "trace": per token the rule's statistic per step (None for prompt
    tokens)}."""
    assert sequence.dim() == 1
    length = sequence.shape[0]
    assert 0 <= prompt_length <= length
    if prompt_length:
        assert prefill_steps is not None and prefill_steps >= 1
    m = _Model(model, block, sequence[None], None)
    K = len(m.block)
    with attn_implementation(model, attn):
        x0 = m.prelude()[0]                                   # (L, D): the prelude is plain causal
        states = []              # token j: [s^0, s^1, .., s^N]
        inputs = []              # token j: inputs[j][k] = [its input to block layer k at steps 1..N] (k >= 1)
        finals, logits, steps, traces = [], [], [], []

        def layer_on(layer, rows):
            """`layer` on rows (i + 1, D) of tokens 0..i, positions 0..i: the last row."""
            i = rows.shape[0] - 1
            mask, pos = m.mask[:, :, : i + 1, : i + 1], m.pos[:, : i + 1]
            rope = tuple(r[:, : i + 1] for r in m.rope)
            out = layer(rows[None], attention_mask=mask, position_ids=pos, position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
            return out[0, -1]

        def head_on(last, i):
            """Coda, norm and head for token i with state `last`, tokens < i at their exit states."""
            rows = torch.stack(finals[:i] + [last])
            for layer in m.layers[m.stop:]:             # plain causal layers over the prefix
                pos, rope = m.pos[:, : i + 1], tuple(r[:, : i + 1] for r in m.rope)
                out = layer(rows[None], attention_mask=m.mask[:, :, : i + 1, : i + 1], position_ids=pos,
                            position_embeddings=rope)
                rows = (out[0] if isinstance(out, tuple) else out)[0]
            hidden = rows[-1]
            if not (step_norm and m.stop == len(m.layers)):
                hidden = m.inner.norm(hidden)
            return m.model.lm_head(hidden)

        for i in range(length):
            prompt = i < prompt_length
            if prompt:
                decider = ExitRule("fixed", threshold=threshold, min_steps=1, max_steps=prefill_steps)
                limit = prefill_steps
            else:
                decider = ExitRule(rule, threshold=threshold, min_steps=min_steps, max_steps=max_steps,
                                   halting=halting)
                limit = max_steps
            mine, my_inputs = [x0[i]], [[] for _ in range(K)]
            for n in range(1, limit + 1):
                y = mine[-1]
                for k, layer in enumerate(m.block):
                    if k == 0:
                        earlier = [states[j][min(n - 1, steps[j])] for j in range(i)]
                    else:
                        my_inputs[k].append(y)
                        earlier = [inputs[j][k][min(n, steps[j]) - 1] for j in range(i)]
                    y = layer_on(layer, torch.stack(earlier + [y]))
                if step_norm:
                    y = m.inner.norm(y)
                mine.append(y)
                logprobs = None
                if decider.rule == "kl":
                    logprobs = torch.log_softmax(head_on(y, i).to(_acc(y.dtype)), -1)
                if bool(decider.exits(n, y, logprobs)):
                    break
            states.append(mine)
            inputs.append(my_inputs)
            steps.append(n)
            finals.append(mine[-1])
            traces.append(None if prompt else decider.trace)
        for i in range(length):
            logits.append(head_on(finals[i], i))
    logits, steps = torch.stack(logits), torch.tensor(steps, dtype=torch.long)
    return (logits, steps, {"states": states, "trace": traces}) if debug else (logits, steps)


def kl_decode_oracle(model, block, *, threshold, min_steps=1, max_steps, prefill_steps, step_norm=False, sequence,
                     prompt_length, attn="sdpa", debug=False):
    """The kl rule in decoding: tokens [0, prompt_length) run prefill_steps
    each; every later token alone, exiting at the first n >= max(2,
    min_steps) with KL(P_n || P_{n-1}) < threshold, else at max_steps.
    Returns (logits (L, V), steps (L,)): each position's logits are the
    coda and head on its exit state with every earlier token final."""
    return token_by_token(model, block, None, rule="kl", threshold=threshold, min_steps=min_steps,
                          max_steps=max_steps, prompt_length=prompt_length, prefill_steps=prefill_steps,
                          step_norm=step_norm, sequence=sequence, attn=attn, debug=debug)
