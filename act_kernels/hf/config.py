"""`LoopedConfig`: a looped model's transformers config (design §15): the
inner causal LM's own config as a sub-config (`text_config`) plus the loop's
settings, saved in config.json under model_type "act_kernels_looped". Importing
act_kernels.hf registers it with AutoConfig, and the model with
AutoModelForCausalLM; without that import, transformers refuses the folder
(an unknown model type) instead of loading the inner model without its loop."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

MODEL_TYPE = "act_kernels_looped"


class LoopedConfig(PreTrainedConfig):
    """text_config: the inner model's config (a PreTrainedConfig or its dict);
    block: (start, stop), the decoder layers pondered per token; max_steps,
    eps, halting_bias_init, step_norm, backend: as `LoopedCausalLM`;
    ponder_weight: τ of the training loss lm_loss + τ · mean ponder cost."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, block=(0, 1), max_steps: int = 8, eps: float = 0.01,
                 halting_bias_init: float = 1.0, step_norm: bool = False, backend: str = "auto",
                 ponder_weight: float = 0.0, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.block = list(block)
        self.max_steps, self.eps, self.halting_bias_init = max_steps, eps, halting_bias_init
        self.step_norm, self.backend, self.ponder_weight = step_norm, backend, ponder_weight
        if text_config is not None:
            kwargs.setdefault("vocab_size", text_config.vocab_size)
            kwargs.setdefault("hidden_size", text_config.hidden_size)
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        implementation = getattr(text_config, "_attn_implementation", None)
        super().__init__(**kwargs)
        if text_config is not None:   # the base init sets every sub-config's attention: the inner model keeps its own
            text_config._attn_implementation = implementation

    def get_text_config(self, *args, **kwargs):
        """The inner model's config: what generation and pipelines read for the
        vocabulary, special tokens and sizes."""
        return self.text_config if self.text_config is not None else self


__all__ = ["LoopedConfig", "MODEL_TYPE"]
