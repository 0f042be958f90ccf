"""The architecture's config hook (vLLM's per-architecture
`VerifyAndUpdateConfig`, registered by `register()`): vLLM calls it while it
builds the engine's config, in the calling process, after hf_overrides are
applied, so a setting the plugin does not serve fails `vllm.LLM(...)` (or
`vllm serve`) at once with an error naming it, before any worker starts. Under the exit rule "act" it also turns CUDA
graphs off (the model runs eager, looped.py)."""
from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .checks import check_config, check_ouro_config, exit_rule
from .huginn_checks import check_huginn_config


def no_cuda_graphs(vllm_config) -> None:
    """Per-token exits size the products by the tokens still running (a host
    sync per loop): no CUDA graph can be replayed over them, and the model is
    left out of torch.compile (looped.py, ouro.py). Set before vLLM fills in
    its defaults, which keep a value already set."""
    from vllm.config import CUDAGraphMode

    vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE


def override_keys(model_config) -> tuple[str, ...]:
    """The keys of the engine's hf_overrides (none read from a callable one)."""
    overrides = model_config.hf_overrides
    return tuple(overrides) if isinstance(overrides, dict) else ()


def one_stage(vllm_config, model: str) -> None:
    """The plugin's models run their loops on one pipeline stage: a loop
    copy's layers would sit on another stage than the layers they share
    weights with (tensor parallelism splits every layer alike instead)."""
    stages = vllm_config.parallel_config.pipeline_parallel_size
    if stages != 1:
        raise ValueError(f"pipeline_parallel_size = {stages}: the vLLM plugin runs {model} on one pipeline stage "
                         "(tensor parallelism is supported)")


class LoopedConfigCheck(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_config(model_config.hf_config)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_config(vllm_config.model_config.hf_config)
        one_stage(vllm_config, "the looped model")
        if exit_rule(vllm_config.model_config.hf_config) == "act":
            no_cuda_graphs(vllm_config)


class OuroConfigCheck(VerifyAndUpdateConfig):
    """Ouro's hook: what OuroConfig refuses, on the config as hf_overrides
    left it and the overrides' keys (checks.py), and, with the frozen exits,
    CUDA graphs off, as under "act": the gate's exits size the products by
    the tokens still running (ouro.py runs eager). The every-loop mode runs
    every token through every loop (fixed shapes): compiled, with vLLM's
    CUDA graphs, as "fixed"."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_ouro_config(model_config.hf_config, override_keys(model_config))

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        _, every_loop = check_ouro_config(model_config.hf_config, override_keys(model_config))
        one_stage(vllm_config, "Ouro")
        if not every_loop:
            no_cuda_graphs(vllm_config)


class HuginnConfigCheck(VerifyAndUpdateConfig):
    """Huginn's hook: its settings (huginn_checks.py), and CUDA graphs off
    where the model runs eager: under an exit criterion the row counts
    depend on the data, and drawn initial states come from the model's own
    generator (`HuginnSettings.compiles`)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_huginn_config(model_config.hf_config, override_keys(model_config))

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        settings = check_huginn_config(model_config.hf_config, override_keys(model_config))
        one_stage(vllm_config, "Huginn")
        if not settings.compiles:
            no_cuda_graphs(vllm_config)


__all__ = ["LoopedConfigCheck", "OuroConfigCheck", "HuginnConfigCheck"]
