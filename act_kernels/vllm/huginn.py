"""`VLLMHuginnForCausalLM`: Huginn (model_type "huginn_raven"; the
published architecture "RavenForCausalLM", and "HuginnForCausalLM" as
`act_kernels.hf.HuginnForCausalLM.save_pretrained` writes it) built from
vLLM's own layers, with our engine's per-token exit (design §18's Huginn):

    e = prelude(wte[ids] · √D);  s_0 = the initial state
    s_n = core(adapter([s_{n−1}, e])),  n = 1 .. num_steps
    hidden = ln_f(coda(ln_f(s_N)))        (the head reads it)

Each sandwich layer is x = norm_2(x + proj(attn(norm_1(x)))), x = norm_4(x
+ mlp(norm_3(x))), built from vLLM's parallel linear layers (Wqkv as one
q/k/v projection, the gated MLP's fc as gate and up halves), qk_bias added
to each head's queries and keys before vLLM's rotary embedding on adjacent
pairs (GPT-J style, rope_base), and vLLM's paged `Attention`. Every
recurrent step has its own paged KV cache, as every loop does in looped.py:
step t's copy of core layer i shares every submodule of step 1's but its
`Attention` (`rows.share_weights`). Layer names carry distinct integers (vLLM's
KV binding reads one per attention layer): `model.layers.{u}` are the
prelude, the core's step 1 and the coda, u counting through them, and
`model.loop_layers.{u}` the core's steps 2.. counting on; the published
parameter names are mapped onto them at loading (`vllm_name`).

num_steps is the config's `mean_recurrence` (as the release runs at
inference; `hf_overrides={"mean_recurrence": n}` changes it). The exit
(hf_overrides `act_exit`; checks.py): "fixed" (the default, every token
num_steps) or Huginn's "latent-diff" criterion with `exit_threshold` and
`exit_min_steps` (act_kernels.layers.exits.RecurrentLatent, the same
arithmetic): a token exits after the first step n > min_steps where
||s_n − s_prev|| / ||s_n|| < threshold, and leaves every later step: the
core layers' projections, norms and MLP, the adapter, and its attention
query (on vLLM's CPU backend) run on the running tokens only, through
rows.py's `running_loops`. Its keys and values at the later steps follow
the frozen-token rule: at core layer 1 those of adapter([s_N, e]), at the
other layers those of its exit step. vLLM's forward cannot tell a prompt's
tokens from decoded ones (no request's prompt length reaches the model; a
sequence recomputed after preemption comes back as one prompt), so here
every token exits by the criterion, prompt tokens included: vLLM's output is
our `HuginnForCausalLM.forward(exit="latent-diff")`'s, token for token,
where our generate runs prompts at num_steps. The criteria that read the
coda at every step (kl, entropy-diff, argmax-stability) are refused: a
prefill chunk's tokens would read each other's peeked coda rows, which our
engine feeds one position at a time.

Initial state: zeros for state_init "zero" or init_values.std 0 (the
outputs equal ours); else Huginn's rule, a normal draw truncated at ±3 std
times √D per token, from the model's own generator seeded with the
engine's seed, drawn alike on every tensor-parallel rank (the draws follow
vLLM's batches, so they are not ours token for token).

At the fixed depth with zero initial states the model is compiled as
vLLM's own models are (torch.compile, CUDA graphs); otherwise it runs eager
with CUDA graphs off (config.py): under the exit the row counts depend on
the data (a host sync per step), and the initial states are drawn from the
model's own generator.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from ..layers.exits import RECURRENT_RULES, exits_now
from ..layers.kinds.sandwich import initial_states
from .causal_lm import LoopedForCausalLM
from .huginn_checks import check_huginn_config
from .rows import agreed, query_key_value, running_loops, share_weights


class _HeadBias(nn.Module):
    """qk_bias's queries' or keys' half on this rank's heads, added per head."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(heads, head_dim), requires_grad=False)
        self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        heads = param.shape[0]
        rank = get_tensor_model_parallel_rank()
        param.data.copy_(loaded.reshape(-1, param.shape[1])[rank * heads:(rank + 1) * heads])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class SandwichAttention(nn.Module):
    """Huginn's attention from vLLM's layers, under the names `rows.query_key_value`
    reads: the q/k/v projection (the published Wqkv), per-head qk_bias,
    rotary on adjacent pairs, paged attention, the output projection."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        d, heads = config.n_embd, config.n_heads
        self.num_heads = heads // get_tensor_model_parallel_world_size()
        self.head_dim = d // heads
        self.q_size = self.kv_size = self.num_heads * self.head_dim
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(d, self.head_dim, heads, heads, bias=False, quant_config=quant,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(d, d, bias=False, quant_config=quant, prefix=f"{prefix}.o_proj")
        self.q_bias = _HeadBias(self.num_heads, self.head_dim) if config.qk_bias else None
        self.k_bias = _HeadBias(self.num_heads, self.head_dim) if config.qk_bias else None
        self.rotary_emb = get_rope(self.head_dim, max_position=config.block_size, is_neox_style=False,
                                   rope_parameters={"rope_theta": float(config.rope_base)})
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def per_head(self, q: torch.Tensor, k: torch.Tensor):
        """qk_bias on the queries and keys (..., heads, head_dim), before the
        rotary embedding (`rows.query_key_value` calls it)."""
        if self.q_bias is None:
            return q, k
        return self.q_bias(q), self.k_bias(k)

    def forward(self, positions: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        o, _ = self.o_proj(self.attn(*query_key_value(self, positions, a)))
        return o


class GatedMLP(nn.Module):
    """proj(silu(a) · b), a, b = fc(x)'s halves (the published fc stacked as gate and up)."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(config.n_embd, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.n_embd, bias=False, quant_config=quant,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(h))
        return out


class SandwichLayer(nn.Module):
    """One sandwich block; `input_layernorm` and `after_attention` are the
    names `rows.running_loops` calls to run it on the running rows."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        d, eps = config.n_embd, config.norm_eps
        self.self_attn = SandwichAttention(vllm_config, config, f"{prefix}.self_attn")
        self.mlp = GatedMLP(vllm_config, config, f"{prefix}.mlp")
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (RMSNorm(d, eps=eps) for _ in range(4))

    @property
    def input_layernorm(self) -> nn.Module:
        return self.norm_1

    def after_attention(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_2(x + o)
        return self.norm_4(x + self.mlp(self.norm_3(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.after_attention(self.self_attn(positions, self.norm_1(x)), x)


def _compiled(vllm_config: VllmConfig) -> bool:
    """vLLM's torch.compile takes the model at the fixed depth with zero
    initial states only (`HuginnSettings.compiles`)."""
    return check_huginn_config(vllm_config.model_config.hf_config).compiles


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0}, enable_if=_compiled)
class HuginnModel(nn.Module):
    """Embedding, prelude, the core (step 1's layers and their step copies),
    adapter, coda and ln_f; forward returns the hidden states the head reads."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        settings = check_huginn_config(config)
        self.steps, d = settings.steps, config.n_embd
        self.rule = None if settings.exit == "fixed" else \
            RECURRENT_RULES[settings.exit](settings.threshold, settings.min_steps, self.steps, d)
        self.std = settings.std
        self.generator = None
        if self.std > 0:   # one seed on every rank: the ranks draw the same states
            self.generator = torch.Generator(device=vllm_config.device_config.device)
            self.generator.manual_seed(int(vllm_config.model_config.seed or 0))
        prelude, core, coda = config.n_layers_in_prelude, config.n_layers_in_recurrent_block, config.n_layers_in_coda
        self.scale = math.sqrt(d)
        self.embed_tokens = VocabParallelEmbedding(config.padded_vocab_size, d, quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        named = prelude + core + coda
        self.layers = nn.ModuleList([SandwichLayer(vllm_config, config, f"{prefix}.layers.{u}")
                                     for u in range(named)])
        copies = {}
        for u in range(named, named + (self.steps - 1) * core):
            layer = SandwichLayer(vllm_config, config, f"{prefix}.loop_layers.{u}")
            share_weights(layer, self.layers[prelude + (u - named) % core])
            copies[str(u)] = layer
        self.loop_layers = nn.ModuleDict(copies)
        # every rank holds the whole state (the row-parallel outputs are all-reduced): the adapter is replicated
        self.adapter = nn.Linear(2 * d, d, bias=config.bias)
        self.ln_f = RMSNorm(d, eps=config.norm_eps)
        # the layers in the order they run (plain lists: the modules are registered above)
        self.prelude = list(self.layers[:prelude])
        self.coda = list(self.layers[prelude + core:])
        stack = list(self.loop_layers.values())
        self.loops = [list(self.layers[prelude:prelude + core])] + \
            [stack[t * core:(t + 1) * core] for t in range(self.steps - 1)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.scale

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        e = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.prelude:
            e = layer(positions, e)
        s = initial_states(e.shape[0], e.shape[1], self.std, self.generator, e)
        s = self._fixed(positions, s, e) if self.rule is None else self._exit(positions, s, e)
        h = self.ln_f(s)
        for layer in self.coda:
            h = layer(positions, h)
        return self.ln_f(h)

    def _fixed(self, positions, s, e):
        """Every token every step."""
        for layers in self.loops:
            s = self.adapter(torch.cat([s, e], -1))
            for layer in layers:
                s = layer(positions, s)
        return s

    def _exit(self, positions, s, e):
        """The steps on the running tokens' rows only (looped.py's "act" with
        Huginn's criterion): s holds every token's state, v every token's
        input to core layer 1, adapter([s, e]); a token's rows stop changing
        at its exit, so later steps read its frozen keys and values."""
        s = s.clone()
        v = self.adapter(torch.cat([s, e], -1))
        tokens = s.shape[0]
        running = torch.ones(tokens, dtype=torch.bool, device=s.device)
        memory = self.rule.new_state(tokens, s.device, s.dtype)
        for n, rows, x in running_loops(self.loops, positions, v, running):
            gone = agreed(exits_now(self.rule, n + 1, self.steps, x, s.index_select(0, rows), None, None, memory,
                                    rows))
            s.index_copy_(0, rows, x)
            if n + 1 < self.steps:   # the next step's input (an exited token's too: its frozen keys and values)
                v.index_copy_(0, rows, self.adapter(torch.cat([x, e.index_select(0, rows)], -1)))
            running.index_copy_(0, rows, ~gone)
        return s


# published parameter name pieces -> ours (before the q/k/v and gate/up stacking)
_RENAMED = [(".attn.proj.", ".self_attn.o_proj."), (".mlp.proj.", ".mlp.down_proj."),
            (".mlp.fc.", ".mlp.gate_up_proj."), (".attn.Wqkv.", ".self_attn.qkv_proj."),
            (".attn.qk_bias", ".self_attn.qk_bias")]


class VLLMHuginnForCausalLM(LoopedForCausalLM):
    """The architectures "RavenForCausalLM" and "HuginnForCausalLM" for vLLM
    (see the module docstring). Weights under the published names:
    `transformer.{wte, prelude.i, core_block.i, coda.i, adapter, ln_f}`,
    `lm_head` (unread where tied), `freqs_cis` (unread: vLLM's rotary
    computes its own table)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = HuginnModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        # vLLM's sampler sizes logits by config.vocab_size: the padding rows of the padded vocabulary are cut
        self.add_head(vllm_config, prefix, vocab_size=config.padded_vocab_size, hidden_size=config.n_embd,
                      tied=bool(config.tie_embeddings), sampled_vocab_size=config.vocab_size)

    def vllm_name(self, name: str) -> str | None:
        """A published name as a parameter name here; None for what is not read."""
        config = self.config
        if name == "freqs_cis" or (self.tied and name.startswith("lm_head.")):
            return None
        if name == "lm_head.weight":
            return name
        if not name.startswith("transformer."):
            raise KeyError(f"checkpoint weight {name!r} is not a published Huginn weight")
        name = name[len("transformer."):]
        part, _, rest = name.partition(".")
        first = {"prelude": 0, "core_block": config.n_layers_in_prelude,
                 "coda": config.n_layers_in_prelude + config.n_layers_in_recurrent_block}
        if part in first:
            index, _, rest = rest.partition(".")
            count = {"prelude": config.n_layers_in_prelude, "core_block": config.n_layers_in_recurrent_block,
                     "coda": config.n_layers_in_coda}[part]
            if not index.isdigit() or int(index) >= count:
                raise KeyError(f"checkpoint weight {name!r}: the config has {count} {part} layers")
            name = f"layers.{first[part] + int(index)}.{rest}"
            for old, new in _RENAMED:
                name = name.replace(old, new)
        elif part == "wte":
            name = f"embed_tokens.{rest}"
        return f"model.{name}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for checkpoint_name, tensor in weights:
            name = self.vllm_name(checkpoint_name)
            if name is None:
                continue
            if name.endswith(".self_attn.qk_bias"):       # (2, 1, H, hd): the queries' half, the keys' half
                stem = name[:-len("qk_bias")]
                for half, which in zip(tensor, ("q_bias", "k_bias")):
                    param = params[self._first(f"{stem}{which}.bias", checkpoint_name, params, loaded)]
                    param.weight_loader(param, half)
                continue
            param = params[self._first(name, checkpoint_name, params, loaded)]
            if ".qkv_proj." in name:
                for shard, part in zip(("q", "k", "v"), tensor.chunk(3, 0)):
                    param.weight_loader(param, part, shard)
            elif ".gate_up_proj." in name:
                for shard, part in enumerate(tensor.chunk(2, 0)):
                    param.weight_loader(param, part, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return loaded

    @staticmethod
    def _first(name: str, checkpoint_name: str, params: dict, loaded: set) -> str:
        """name, a parameter here loaded once only (recorded in loaded)."""
        if name not in params:
            raise KeyError(f"checkpoint weight {checkpoint_name!r} (as {name!r}) has no parameter here")
        if name in loaded:
            raise KeyError(f"checkpoint weight {checkpoint_name!r}: {name!r} was loaded already")
        loaded.add(name)
        return name


__all__ = ["VLLMHuginnForCausalLM", "HuginnModel", "SandwichLayer", "initial_states"]
