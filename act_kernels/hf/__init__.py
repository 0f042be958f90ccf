"""Bring your own model (design §15): per-token ACT over a transformers
causal LM's own decoder layers (Llama, Qwen2/3, Mistral without a sliding
window, and the like), as a transformers model: it trains under
transformers.Trainer, saves and loads (AutoModelForCausalLM too, once this
package is imported), and generates batched over the ragged cache with
transformers' generation config, logits processors, stopping criteria and
streamers. The only part of the package that imports transformers
(`pip install "act_kernels[hf]"`).

    model = transformers.LlamaForCausalLM(config)
    looped = act_kernels.hf.LoopedCausalLM(model, block=(1, 3), max_steps=8, ponder_weight=0.01)
    out = looped(input_ids, attention_mask, labels=input_ids)     # out.loss = lm loss + τ · mean ponder cost
    out.loss.backward()
    sequences = looped.generate(input_ids, attention_mask, max_new_tokens=32)
"""
try:
    import transformers  # noqa: F401
except ImportError as error:   # pragma: no cover - the message is the point
    raise ImportError("act_kernels.hf needs transformers: pip install \"act_kernels[hf]\" "
                      "(transformers>=5,<6)") from error

from transformers import AutoConfig, AutoModelForCausalLM

from ..models.core import PonderNetTerms
from .config import MODEL_TYPE, LoopedConfig
from .generation import LoopedGenerateOutput
from .model import LoopedCausalLM, LoopedCausalLMOutput
from .ouro import OuroConfig, OuroForCausalLM
from .huginn import HuginnConfig, HuginnForCausalLM

AutoConfig.register(MODEL_TYPE, LoopedConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopedConfig, LoopedCausalLM, exist_ok=True)
AutoConfig.register(OuroConfig.model_type, OuroConfig, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)
AutoConfig.register(HuginnConfig.model_type, HuginnConfig, exist_ok=True)
AutoModelForCausalLM.register(HuginnConfig, HuginnForCausalLM, exist_ok=True)

__all__ = ["LoopedCausalLM", "LoopedConfig", "LoopedCausalLMOutput", "LoopedGenerateOutput", "PonderNetTerms",
           "OuroConfig", "OuroForCausalLM", "HuginnConfig", "HuginnForCausalLM"]
