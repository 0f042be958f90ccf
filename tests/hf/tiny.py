"""Tiny transformers models made from configs (no hub downloads), float64."""
import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 61


def llama(seed=0, layers=4, dtype=torch.float64, **over):
    """A Llama with grouped-query attention (4 query heads, 2 kv heads)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, **over)
    return _no_eos(transformers.LlamaForCausalLM(config).to(dtype).eval())


def qwen3(seed=0, layers=4, dtype=torch.float64, **over):
    """A Qwen3 (q/k norms, GQA 4/2)."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, **over)
    return _no_eos(transformers.Qwen3ForCausalLM(config).to(dtype).eval())


def _no_eos(model):
    """Random weights emit any token: generation runs max_new_tokens unless a test names an eos."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def vary(looped, seed=0, scale=1.0, bias=0.0):
    """A halting unit whose steps differ from token to token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = looped.halting.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * scale)
        looped.halting.bias.fill_(bias)
    return looped


MODELS = {"llama": llama, "qwen3": qwen3}


def batch(seed=0, rows=3, length=9, left=True):
    """input_ids and an attention_mask with one left- (or right-) padded row and one shorter row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    if left:
        mask[0, :3] = 0
    else:
        mask[0, length - 3:] = 0
    if rows > 1:
        mask[1, length - 2:] = 0 if not left else 1
        if left:
            mask[1, :1] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)
