"""Bring your own model: a small Llama, looped per token with ACT, one
training step (the ponder cost in the loss), then batched generation, the
ponder steps of each token with return_dict_in_generate (the README's
example)."""
import torch
import transformers

from act_kernels.hf import LoopedCausalLM

config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = transformers.LlamaForCausalLM(config)            # or from_pretrained(a local folder)
looped = LoopedCausalLM(model, block=(1, 3), max_steps=8, ponder_weight=0.01)   # layers 1 and 2 ponder per token

input_ids = torch.randint(0, 256, (4, 32))
attention_mask = torch.ones_like(input_ids)
attention_mask[0, :5] = 0                                # a left-padded row
opt = torch.optim.AdamW(looped.parameters(), lr=1e-3)
out = looped(input_ids, attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100))
out.loss.backward()                                      # lm_loss + 0.01 * mean ponder cost
opt.step()
print(f"loss {out.loss.item():.3f}, mean steps {out.steps[attention_mask.bool()].float().mean():.2f}")

sequences = looped.generate(input_ids, attention_mask, max_new_tokens=16)            # (4, 48), as transformers
gen = looped.generate(input_ids, attention_mask, max_new_tokens=16, return_dict_in_generate=True)
print(gen.sequences.shape, gen.steps[:, 32:])           # each new token's ponder steps
