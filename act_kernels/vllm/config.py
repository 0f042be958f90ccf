"""The architecture's config hook (vLLM's per-architecture
`VerifyAndUpdateConfig`, registered by `register()`): vLLM calls it while it
builds the engine's config, in the calling process, after hf_overrides are
applied, so a setting the plugin does not serve fails `vllm.LLM(...)` (or
`vllm serve`) at once with an error naming it, before any worker starts."""
from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .checks import check_config


class LoopedConfigCheck(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_config(model_config.hf_config)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_config(vllm_config.model_config.hf_config)
        stages = vllm_config.parallel_config.pipeline_parallel_size
        if stages != 1:
            raise ValueError(f"pipeline_parallel_size = {stages}: the vLLM plugin runs the looped model on one "
                             "pipeline stage (tensor parallelism is supported)")


__all__ = ["LoopedConfigCheck"]
