"""The byte LM of `python -m act_kernels.train lm` as a transformers model
(`--arch llama | qwen3`): a LlamaForCausalLM or Qwen3ForCausalLM built from a
config (vocabulary 256, the bytes), either pondered with ACT over its decoder
layers [start, stop) by `act_kernels.hf.LoopedCausalLM` (design §15), or
trained plain (`--plain`, every layer once, transformers' own forward), or
loaded from a plain run's `save_pretrained` folder and retrofitted with the
loop (`--retrofit DIR`).

transformers is imported here only, and this module only when one of those
options asks for it, so the package and the other commands work without it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

ARCHS = ("llama", "qwen3")
_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
VOCAB = 256
INSTALL = 'pip install -e ".[hf]"'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"--arch llama / qwen3 and --retrofit train a transformers model, and transformers is not "
                         f"installed: {INSTALL} (or pip install \"act_kernels[hf]\"; transformers>=5,<6)") from None
    return transformers


def default_block(layers: int) -> Tuple[int, int]:
    """The middle layers: one prelude and one coda layer around the block
    (as ACTLanguageModel's default), or every layer when there are fewer than 3."""
    return (1, layers - 1) if layers >= 3 else (0, layers)


def check_block(block, layers: int) -> Tuple[int, int]:
    start, stop = block
    if start >= stop:
        raise SystemExit(f"--block {start} {stop} is empty: it ponders decoder layers [A, B), which needs A < B")
    if start < 0 or stop > layers:
        raise SystemExit(f"--block {start} {stop} lies outside the model's {layers} decoder layers: it needs "
                         f"0 <= A < B <= {layers}")
    return int(start), int(stop)


def intermediate_size(d_model: int) -> int:
    """SwiGLU's width at the parameters of a GELU MLP of 4 d_model: 8/3 d_model, up to a multiple of 8."""
    return -(-8 * d_model // 3 // 8) * 8


def _saved_config(directory: str):
    transformers = _transformers()
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise SystemExit(f"--retrofit {directory}: no config.json there; give the folder a --plain run wrote "
                         "(transformers' save_pretrained)")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHS:
        raise SystemExit(f"--retrofit {directory}: a {arch!r} model; this command trains {' or '.join(ARCHS)}")
    if config.vocab_size != VOCAB:
        raise SystemExit(f"--retrofit {directory}: vocab_size {config.vocab_size}, but the byte LM's is {VOCAB}")
    return config


def resolve(args) -> None:
    """Fills in args.arch, args.layers and args.block (None with --plain) and
    refuses what cannot train, before anything is built or read."""
    if args.retrofit:
        config = _saved_config(args.retrofit)
        if args.arch not in (None, config.model_type):
            raise SystemExit(f"--arch {args.arch}, but --retrofit {args.retrofit} holds a {config.model_type} model")
        if args.layers not in (None, config.num_hidden_layers):
            raise SystemExit(f"--layers {args.layers}, but --retrofit {args.retrofit} holds "
                             f"{config.num_hidden_layers} decoder layers")
        args.arch, args.layers = config.model_type, config.num_hidden_layers
    else:
        _transformers()
        args.layers = 4 if args.layers is None else args.layers
        if args.layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {args.layers}")
        if args.d_model % args.heads or args.heads % args.kv_heads:
            raise SystemExit(f"--d-model {args.d_model}, --heads {args.heads}, --kv-heads {args.kv_heads}: "
                             "d_model must be a multiple of heads, and heads of kv heads")
    if args.plain:
        if args.block is not None or args.fixed_steps:
            raise SystemExit("--plain trains the model without a loop: --block and --fixed-steps do not apply")
        return
    args.block = check_block(args.block, args.layers) if args.block is not None else default_block(args.layers)


def _new_model(args):
    transformers = _transformers()
    config_class, model_class = (getattr(transformers, n) for n in _CLASSES[args.arch])
    config = config_class(vocab_size=VOCAB, hidden_size=args.d_model, num_hidden_layers=args.layers,
                          intermediate_size=args.intermediate or intermediate_size(args.d_model),
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          head_dim=args.d_model // args.heads,
                          max_position_embeddings=max(args.context + 1, args.sample_bytes + 64),
                          bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = model_class(config)
    model.generation_config.eos_token_id = None   # bytes: no end-of-text token, samples run their full length
    model.generation_config.pad_token_id = 0
    return model


def _load_model(directory: str):
    transformers = _transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)


class TransformersRunner:
    """What lm's training loop needs of the model: `module` (its parameters,
    state and train/eval mode), `__call__(batch)` on windows (B, C + 1) ->
    (logits (B, C, 256), transformers' loss, ponder cost (B, C) or None,
    steps (B, C)), `sample`, `save` and the layer applications per token."""

    def __init__(self, args, device):
        model = _load_model(args.retrofit) if args.retrofit else _new_model(args)
        config = model.config
        self.model, self.plain, self.layers = model, bool(args.plain), config.num_hidden_layers
        self.looped = None
        if not self.plain:
            from ..hf import LoopedCausalLM

            bias = args.halting_bias if args.halting_bias is not None else (-40.0 if args.fixed_steps else -1.0)
            self.looped = LoopedCausalLM(model, block=args.block, max_steps=args.fixed_steps or args.max_steps,
                                         eps=args.eps, halting_bias_init=bias, backend=args.backend)
            if args.fixed_steps:   # the halting unit of lm.build_model's fixed depth: never halts before step K
                with torch.no_grad():
                    self.looped.halting.weight.zero_()
                self.looped.halting.requires_grad_(False)
        self.halting, self.args = args.halting, args
        if args.halting == "pondernet" and self.looped is not None and self.looped.coda is not None:
            raise SystemExit(f"--halting pondernet reads the head on every step's state: the block must be the "
                             f"model's last layers (--block A {self.layers}), got --block {args.block[0]} "
                             f"{args.block[1]}")
        # --sample-depth: each training batch's depth, drawn from its own generator
        self.depths = torch.Generator().manual_seed(args.seed + 1) if args.sample_depth else None
        self.module = (self.looped or model).to(device)
        self.module.train()
        # the settings the model has, whatever the command line said (a retrofit keeps the saved model's)
        self.settings = dict(arch=config.model_type, d_model=config.hidden_size, heads=config.num_attention_heads,
                             kv_heads=config.num_key_value_heads, intermediate=config.intermediate_size,
                             layers=self.layers, block=None if self.plain else list(args.block))
        if args.retrofit:
            base = Path(args.retrofit) / "summary.json"
            self.settings["base_iterations"] = json.loads(base.read_text())["config"]["iterations"] \
                if base.is_file() else None

    def __call__(self, batch: Tensor):
        if self.plain:
            out = self.model(input_ids=batch, labels=batch, use_cache=False)
            steps = torch.ones(batch.shape[0], batch.shape[1] - 1, dtype=torch.int64, device=batch.device)
            return out.logits[:, :-1], out.loss, None, steps
        looped = self.looped
        if self.halting == "pondernet":
            if looped.training:
                objective = looped.pondernet(batch, labels=batch, beta=self.args.beta, prior=self.args.prior,
                                             entropy=self.args.entropy)
                return None, objective.loss, None, objective.steps[:, :-1]
            with torch.no_grad():   # evaluation reads the halting unit as the exit gate it was trained to be
                out = looped(batch, exit="gate", threshold=self.args.exit_threshold)
            return out.logits[:, :-1], None, None, out.steps[:, :-1]
        if self.depths is not None and looped.training:   # this batch's depth, 1..K (the block's max_steps)
            depth = int(torch.randint(1, looped.max_steps + 1, (1,), generator=self.depths))
            full, looped.block.max_steps = looped.block.max_steps, depth
            try:
                out = looped(batch, labels=batch)
            finally:
                looped.block.max_steps = full
        else:
            out = looped(batch, labels=batch)
        return out.logits[:, :-1], out.loss, out.ponder_cost[:, :-1], out.steps[:, :-1]

    def layer_applications(self, mean_steps: float) -> float:
        """Decoder layers applied per token: prelude + block layers x mean steps + coda."""
        if self.plain:
            return float(self.layers)
        start, stop = self.looped.block_range
        return start + (stop - start) * mean_steps + (self.layers - stop)

    def sample(self, prompt: Tensor, new: int, seed: int, device) -> Tensor:
        ids = prompt[None]
        if self.plain:
            torch.manual_seed(seed)   # transformers' generate draws from the global generator
            was = self.model.training
            self.model.eval()
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=True,
                                          temperature=0.8, top_k=40, top_p=1.0)
            self.model.train(was)
            return out[0]
        rule = dict(exit="gate", threshold=self.args.exit_threshold) if self.halting == "pondernet" else {}
        out = self.looped.generate(ids, max_new_tokens=new, do_sample=True, temperature=0.8, top_k=40,
                                   generator=torch.Generator(device=device).manual_seed(seed), **rule)
        return out[0]

    def save(self, directory: Path) -> Optional[str]:
        """The trained model, reloadable: transformers' save_pretrained (--plain;
        `--retrofit` reads it) or LoopedCausalLM.save_pretrained (LoopedCausalLM.from_pretrained)."""
        (self.model if self.plain else self.looped).save_pretrained(str(directory))
        return "save_pretrained" if self.plain else "LoopedCausalLM.save_pretrained"


__all__ = ["ARCHS", "TransformersRunner", "resolve", "default_block", "check_block", "intermediate_size"]
