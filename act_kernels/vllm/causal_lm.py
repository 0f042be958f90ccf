"""What vLLM calls on each of the plugin's model classes, written once:
the inner model (`self.model`, with `embed_tokens` and `embed_input_ids`),
the head over it (tied to its embedding where the config says so), the
logits processor, and the forward that hands vLLM's arguments on."""
from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors


class LoopedForCausalLM(nn.Module):
    """A subclass builds `self.model` and calls `add_head`; it loads its own weights."""

    def add_head(self, vllm_config: VllmConfig, prefix: str, *, vocab_size: int, hidden_size: int, tied: bool,
                 sampled_vocab_size: int | None = None, scale: float = 1.0) -> None:
        """The head of vocab_size rows over self.model (tied: its embedding's
        weight) and the logits processor; sampled_vocab_size: where the
        logits are cut for vLLM's sampler (a padded vocabulary's real size)."""
        self.lm_head = ParallelLMHead(vocab_size, hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.tied = tied
        if tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(vocab_size, sampled_vocab_size, scale=scale)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)


__all__ = ["LoopedForCausalLM"]
