"""Bring your own model (design §15): per-token ACT over a transformers
causal LM's own decoder layers (Llama, Qwen2/3, Mistral without a sliding
window, and the like), trained as any transformers model and generating
batched over the ragged cache. The only part of the package that imports
transformers (`pip install "act_kernels[hf]"`).

    model = transformers.LlamaForCausalLM(config)
    looped = act_kernels.hf.LoopedCausalLM(model, block=(1, 3), max_steps=8)
    out = looped(input_ids, attention_mask, labels=input_ids)
    (out.loss + tau * out.ponder_cost.sum() / attention_mask.sum()).backward()
    gen = looped.generate(input_ids, attention_mask, max_new_tokens=32)
"""
try:
    import transformers  # noqa: F401
except ImportError as error:   # pragma: no cover - the message is the point
    raise ImportError("act_kernels.hf needs transformers: pip install \"act_kernels[hf]\" "
                      "(transformers>=5,<6)") from error

from .looped import LoopedCausalLM, LoopedGeneration, LoopedOutput, LoopedPonderNet

__all__ = ["LoopedCausalLM", "LoopedOutput", "LoopedGeneration", "LoopedPonderNet"]
