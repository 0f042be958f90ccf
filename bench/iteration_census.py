"""ATen calls and host time of one depth-wise block iteration against
transformers' decode step (one thread, CPU): the workload of
bench/hf_workloads.py (a Llama with hidden 256, block (1, 3), max_steps 8,
16 left-padded prompts), generating with schedule="depthwise" over

- the lean decoder rows (layers/kinds/lean_decoder.py, the default), and
- the layers' own forward (`DecoderLayerRows`, what ran before them),

against transformers' own generate of the unrolled model (18 layers, one
decode step per new token for all 16 sequences). Counted with a
TorchDispatchMode (views excluded, as tests/census.py does); time from the
process clock. Per block iteration the counts include everything of the
iteration: the block's layers, the prelude for entering tokens, the coda and
head for halting ones, the scheduler's bookkeeping.

    OMP_NUM_THREADS=1 python bench/iteration_census.py [MEAN_STEPS]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_workloads as hw  # noqa: E402

VIEWS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice",
         "select", "permute", "alias", "detach", "split", "unbind", "chunk", "split_with_sizes", "reshape",
         "_reshape_alias", "unflatten"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def per_iteration(run, iterations_of):
    """(ATen calls, host seconds) of one run, each divided by its iterations."""
    run()                                      # warm
    count = Count()
    with count:
        out = run()
    start = time.process_time()
    out = run()
    seconds = time.process_time() - start
    n = iterations_of(out)
    return count.calls / n, seconds / n, n


def main(argv):
    torch.set_num_threads(1)
    if argv:
        hw.MEAN_STEPS = float(argv[0])
    looped, model = hw.controlled_llama()
    plain = hw.unrolled(model)
    ids, mask = hw.left_padded(16, 32, 128)
    new = 16
    rows = {}
    from act_kernels.layers.kinds import lean_decoder
    for name, lean in (("lean rows", True), ("layers' own forward", False)):
        built = lean_decoder.decoder_kind
        lean_decoder_kind = (lambda *a, **k: built(*a, **k)) if lean else (lambda *a, **k: built(*a, lean=False, **k))
        looped.block.kind = lean_decoder_kind(looped.block.kind.layers, looped.model.model.rotary_emb,
                                              looped.model.config)
        for stack in (looped.prelude, looped.coda):
            stack.kind = lean_decoder_kind(stack.kind.layers, looped.model.model.rotary_emb, looped.model.config)
        rows[name] = per_iteration(lambda: hw.generate_ours(looped, ids, mask, "depthwise", new),
                                   lambda out: out.iterations)
    rows["transformers' decode step (18 layers)"] = per_iteration(
        lambda: hw.generate_hf(plain, ids, mask, new), lambda out: new)
    print(f"mean N {hw.MEAN_STEPS}, 16 prompts, {new} new tokens; per block iteration (ours) or decode step (transformers)")
    print("| path | ATen calls | host ms (process time) | iterations |")
    print("|---|---|---|---|")
    for name, (calls, seconds, n) in rows.items():
        print(f"| {name} | {calls:.0f} | {seconds * 1e3:.2f} | {n} |")


if __name__ == "__main__":
    main(sys.argv[1:])
