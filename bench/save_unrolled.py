"""Saves the generation benchmark's unrolled Llama and prompts for the vLLM
baseline (bench/vllm_unrolled.py). Run in the main environment (it builds
the model through bench/hf_workloads.py, whose `controlled_llama` imports
act_kernels):

    OMP_NUM_THREADS=1 python bench/save_unrolled.py [FOLDER]   # default /tmp/act_unrolled_llama

FOLDER gets:
- the unrolled LlamaForCausalLM of hf_workloads (`unrolled(controlled_llama()[1])`:
  prelude 1 + block 2 x max_steps 8 + coda 1 = 18 layers, hidden 256, GQA
  4 / 2 heads of 64, byte vocabulary 256, no eos), saved with
  `save_pretrained` in float32 (safetensors + config.json);
- prompts.json: the 64 prompts of hf_workloads' batch-64 generation
  (`left_padded(64, 32, 128)`, seed 1: 32..128 random bytes each) as lists
  of token ids without the padding, the new-token count (hf_workloads.NEW_TOKENS),
  and, as a check that vLLM runs the same weights, transformers' greedy
  continuation of the first CHECK prompts (one at a time, no padding).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_workloads as hw  # noqa: E402

PROMPTS, LOW, HIGH = 64, 32, 128
CHECK = 4
DEFAULT_FOLDER = "/tmp/act_unrolled_llama"


def prompts(count: int = PROMPTS) -> list[list[int]]:
    """The benchmark's prompts, each a list of byte ids without the left padding."""
    ids, mask = hw.left_padded(count, LOW, HIGH)
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def greedy(plain, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=hw.PAD)
    return out[0, len(prompt):].tolist()


def main(argv):
    torch.set_num_threads(1)
    folder = Path(argv[0] if argv else DEFAULT_FOLDER)
    _, model = hw.controlled_llama()
    plain = hw.unrolled(model).to(torch.float32).eval()
    plain.config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    given = prompts()
    with torch.no_grad():
        check = [greedy(plain, p, hw.NEW_TOKENS) for p in given[:CHECK]]
    meta = {"prompts": given, "new_tokens": hw.NEW_TOKENS, "source": "bench/hf_workloads.py left_padded(64, 32, 128)",
            "layers": hw.UNROLLED_LAYERS, "greedy_check": check}
    (folder / "prompts.json").write_text(json.dumps(meta))
    lengths = [len(p) for p in given]
    print(f"saved {folder}: {hw.UNROLLED_LAYERS} layers, {sum(p.numel() for p in plain.parameters())} parameters, "
          f"{len(given)} prompts of {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all), "
          f"{hw.NEW_TOKENS} new tokens each")


if __name__ == "__main__":
    main(sys.argv[1:])
