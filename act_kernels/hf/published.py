"""What the model kinds loaded from their own published format (Ouro,
Huginn) share on top of `LoopedCausalLM`: their layers are our modules under
the published parameter names and run in the engine's rows (no attention
interface to switch), `lm_head` is the head, the pondered block is kept
beside the modules (not a submodule: its one parameter, the halting unit,
is one of the model's own modules or unused), and their configs read the
keys every transformers config carries."""
from __future__ import annotations

import contextlib

from torch import Tensor, nn
from transformers import PreTrainedModel

from ..layers.kinds import RMSNorm
from .model import LoopedCausalLM

# read as transformers reads them in every config (ids, dtype, the folder's provenance)
COMMON_KEYS = frozenset({"architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
                         "dtype", "transformers_version", "model_type", "_name_or_path", "name_or_path", "id2label",
                         "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states",
                         "is_encoder_decoder", "chunk_size_feed_forward", "_attn_implementation",
                         "attn_implementation"})


class PublishedLoopedLM(LoopedCausalLM):
    """The shared part of OuroForCausalLM and HuginnForCausalLM. A subclass
    builds its modules and its block (`_keep_block`), and says its weights'
    initial std (`_init_std`)."""

    base_model_prefix = ""

    def _keep_block(self, block) -> None:
        object.__setattr__(self, "block", block)

    def _init_std(self) -> float:
        raise NotImplementedError

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self._init_std())
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.block.train(mode)          # not a submodule: its mode follows the model's here
        return self

    @property
    def backend(self) -> str:
        return self.config.backend

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def resize_token_embeddings(self, *args, **kwargs):
        return PreTrainedModel.resize_token_embeddings(self, *args, **kwargs)

    def _scope(self):
        return contextlib.nullcontext()     # the engine's rows call no attention interface

    def _lm_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_function(logits, labels, vocab_size=self.vocab_size)


__all__ = ["COMMON_KEYS", "PublishedLoopedLM"]
