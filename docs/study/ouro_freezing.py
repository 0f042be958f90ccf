"""Issue 34: the quality cost of freezing exited tokens (our engine's exit
rule) against every_loop (Ouro's release: every loop for every token, the
exit picked afterwards), on a tiny Ouro trained here with its own objective.

Trains a tiny byte-level OuroForCausalLM (vocabulary 256, 2 layers looped
4 times) with `pondernet(..., entropy=True)` (Ouro's entropy-regularized
objective) on the repository's own *.md and *.py files as they are at a
pinned commit (every tenth file, in sorted path order, held out), then on
held-out 128-byte windows measures, per gate threshold, bits per byte and
next-byte accuracy of

  frozen      model(ids, mask, threshold=t)                  (exit="gate", default)
  every_loop  model(ids, mask, threshold=t, every_loop=True)
  fixed       model(ids, mask, exit="fixed")                 (all loops)

with the mean exit loop and the fraction of loop work each saves, and the
greedy-generation agreement of frozen and every_loop over 32 new bytes.
Writes docs/study/ouro_freezing.json and rewrites the marked tables of
docs/study/ouro_freezing.md.

    OMP_NUM_THREADS=1 python docs/study/ouro_freezing.py
    python docs/study/ouro_freezing.py --redraw     # the tables again, from the json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from act_kernels.hf import OuroConfig, OuroForCausalLM  # noqa: E402

# the corpus: the repository's *.md and *.py files as they are at this commit (fixed, so that reruns read the
# same bytes whatever the working tree holds, this study's own files included)
DATA_COMMIT = "f444fbb6ff8a6c86ec7b8f23d276545d01f30ed3"
THRESHOLDS = (0.3, 0.5, 0.7, 0.9, 1.0)


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True).stdout.decode()


def corpus(commit: str, every: int):
    """(train bytes, held-out bytes, file counts): the *.md and *.py files at
    `commit`, sorted by path, every `every`-th file (the 0th, every-th, ...)
    held out, each file followed by a blank line."""
    paths = sorted(p for p in git("ls-tree", "-r", "--name-only", commit).splitlines()
                   if p.endswith((".md", ".py")))
    train, held = bytearray(), bytearray()
    for i, path in enumerate(paths):
        data = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                              capture_output=True).stdout + b"\n\n"
        (held if i % every == 0 else train).extend(data)
    n_held = len(range(0, len(paths), every))
    return (torch.tensor(list(train), dtype=torch.int64), torch.tensor(list(held), dtype=torch.int64),
            {"files": len(paths), "train_files": len(paths) - n_held, "heldout_files": n_held})


def build(args, total_ut_steps: int) -> OuroForCausalLM:
    config = OuroConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
                        total_ut_steps=total_ut_steps, max_position_embeddings=512,
                        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return OuroForCausalLM(config)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, data: torch.Tensor, args):
    gen = torch.Generator().manual_seed(args.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    mask = torch.ones(args.batch, args.seq, dtype=torch.int64)
    curve, window = [], []
    model.train()
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        offsets = torch.randint(0, data.numel() - args.seq, (args.batch,), generator=gen)
        ids = torch.stack([data[o:o + args.seq] for o in offsets.tolist()])
        out = model.pondernet(ids, mask, beta=args.beta, entropy=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append((out.loss.item(), out.expected_loss.item(), out.regularizer.item(),
                       out.steps.float().mean().item()))
        if (step + 1) % args.log_every == 0 or step == 0:
            n = len(window)
            row = {"step": step + 1, "loss": sum(w[0] for w in window) / n,
                   "expected_loss": sum(w[1] for w in window) / n, "entropy": sum(w[2] for w in window) / n,
                   "train_loops": sum(w[3] for w in window) / n, "lr": lr_at(step, args),
                   "seconds": round(time.time() - start, 1)}
            curve.append(row)
            window = []
            print(f"step {row['step']:5d}  loss {row['loss']:.4f}  expected CE {row['expected_loss']:.4f} nats  "
                  f"entropy {row['entropy']:.3f}  loops {row['train_loops']:.2f}  {row['seconds']:.0f}s", flush=True)
    return curve, time.time() - start


def windows(data: torch.Tensor, seq: int, limit: int) -> torch.Tensor:
    n = min(data.numel() // seq, limit)
    return data[:n * seq].view(n, seq)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, batch: int, **kwargs):
    """Bits per byte and accuracy of the next byte within each window, the
    exit loops (`.steps`) and the loops run (`.ponder_cost`), the argmaxes."""
    nll = correct = count = 0.0
    steps, cost, argmaxes = [], [], []
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        out = model(x, torch.ones_like(x), **kwargs)
        logits = out.logits[:, :-1].double()
        target = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        pred = logits.argmax(-1)
        correct += (pred == target).sum().item()
        count += target.numel()
        steps.append(out.steps.reshape(-1))
        cost.append(out.ponder_cost.reshape(-1))
        argmaxes.append(pred.reshape(-1))
    steps, cost = torch.cat(steps).double(), torch.cat(cost).double()
    loops = model.config.total_ut_steps
    histogram = [(steps == k).double().mean().item() for k in range(1, loops + 1)]
    return {"bits_per_byte": nll / count / math.log(2), "accuracy": correct / count,
            "mean_exit_loop": steps.mean().item(), "exit_loop_histogram": histogram,
            "loops_run_per_token": cost.mean().item(), "work_saved": 1.0 - cost.mean().item() / loops}, \
        torch.cat(argmaxes)


@torch.no_grad()
def agreement(model, prompts: torch.Tensor, new: int, threshold: float):
    mask = torch.ones_like(prompts)
    common = dict(max_new_tokens=new, do_sample=False, threshold=threshold, return_dict_in_generate=True)
    frozen = model.generate(prompts, mask, **common)
    every = model.generate(prompts, mask, every_loop=True, **common)
    a, b = frozen.sequences[:, prompts.shape[1]:], every.sequences[:, prompts.shape[1]:]
    assert a.shape == b.shape == (prompts.shape[0], new), (a.shape, b.shape)
    same = a == b
    first = [int((~row).nonzero()[0]) if (~row).any() else new for row in same]
    return {"identical_tokens": same.double().mean().item(),
            "identical_sequences": same.all(1).double().mean().item(),
            "first_divergence": first,
            "frozen_mean_exit_loop_new": frozen.steps[:, prompts.shape[1]:].double().mean().item(),
            "every_loop_mean_exit_loop_new": every.steps[:, prompts.shape[1]:].double().mean().item(),
            "frozen_text": [bytes(r.tolist()).decode("utf-8", "replace") for r in a],
            "every_loop_text": [bytes(r.tolist()).decode("utf-8", "replace") for r in b]}


def table(result) -> str:
    fixed = result["fixed"]
    lines = ["| threshold | frozen bpb | every_loop bpb | freezing cost (bpb) | frozen acc | every_loop acc "
             "| mean exit loop: frozen / every_loop | loop work saved: frozen / every_loop "
             "| next-byte argmax agreement | greedy generation: identical tokens / sequences |",
             "|---|" + "---|" * 9]
    for row in result["thresholds"]:
        fr, ev, g = row["frozen"], row["every_loop"], row["generation"]
        n = len(g["first_divergence"])
        lines.append(f"| {row['threshold']} | {fr['bits_per_byte']:.4f} | {ev['bits_per_byte']:.4f} "
                     f"| {fr['bits_per_byte'] - ev['bits_per_byte']:+.4f} "
                     f"| {100 * fr['accuracy']:.2f} % | {100 * ev['accuracy']:.2f} % "
                     f"| {fr['mean_exit_loop']:.3f} / {ev['mean_exit_loop']:.3f} "
                     f"| {100 * fr['work_saved']:.1f} % / {100 * ev['work_saved']:.1f} % "
                     f"| {100 * row['argmax_agreement']:.2f} % "
                     f"| {100 * g['identical_tokens']:.1f} % / {round(n * g['identical_sequences'])} of {n} |")
    lines.append(f"| exit=\"fixed\" (4 loops) | {fixed['bits_per_byte']:.4f} | | | {100 * fixed['accuracy']:.2f} % | "
                 f"| {fixed['mean_exit_loop']:.3f} | {100 * fixed['work_saved']:.1f} % | | |")
    return "\n".join(lines)


def loops_table(result) -> str:
    lines = ["| loops (every token, no gate) | 1 | 2 | 3 | 4 |", "|---|---|---|---|---|"]
    rows = result["fixed_k"]
    lines.append("| held-out bits per byte | " + " | ".join(f"{r['bits_per_byte']:.4f}" for r in rows) + " |")
    lines.append("| accuracy | " + " | ".join(f"{100 * r['accuracy']:.2f} %" for r in rows) + " |")
    return "\n".join(lines)


def exits_table(result) -> str:
    lines = ["| threshold | frozen: share of tokens exiting at loop 1 / 2 / 3 / 4 "
             "| every_loop: share exiting at loop 1 / 2 / 3 / 4 |", "|---|---|---|"]
    for row in result["thresholds"]:
        cells = [" / ".join(f"{100 * h:.1f}" for h in row[k]["exit_loop_histogram"]) + " %"
                 for k in ("frozen", "every_loop")]
        lines.append(f"| {row['threshold']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def curve_table(result) -> str:
    curve = result["training"]["curve"]
    picks = [curve[0]] + [r for r in curve if r["step"] % (5 * result["config"]["log_every"]) == 0]
    if picks[-1] is not curve[-1]:
        picks.append(curve[-1])
    lines = ["| step | objective | expected CE (nats) | entropy of p | loops run (train) |", "|---|---|---|---|---|"]
    for r in picks:
        lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['expected_loss']:.4f} | {r['entropy']:.3f} "
                     f"| {r['train_loops']:.2f} |")
    return "\n".join(lines)


def rewrite_md(path: Path, blocks: dict) -> None:
    """Rewrites each block between `<!-- ouro_freezing:NAME -->` and
    `<!-- /ouro_freezing -->` of the markdown (the prose around them is
    kept); a file that is not there gets the blocks alone."""
    if not path.exists():
        path.write_text("".join(f"<!-- ouro_freezing:{k} -->\n<!-- /ouro_freezing -->\n\n" for k in blocks))
    text = path.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- ouro_freezing:{name} -->\n).*?(<!-- /ouro_freezing -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: no block ouro_freezing:{name}")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    path.write_text(text)


def redraw(result, md: Path) -> None:
    blocks = {"results": table(result), "exits": exits_table(result), "loops": loops_table(result),
              "curve": curve_table(result)}
    rewrite_md(md, blocks)
    for body in blocks.values():
        print("\n" + body)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-every", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--data-commit", default=DATA_COMMIT)
    parser.add_argument("--out", default=str(HERE / "ouro_freezing.json"))
    parser.add_argument("--md", default=str(HERE / "ouro_freezing.md"))
    parser.add_argument("--redraw", action="store_true",
                        help="rewrite the markdown's tables from the json (--out) without training")
    args = parser.parse_args()
    if args.redraw:
        redraw(json.loads(Path(args.out).read_text()), Path(args.md))
        return

    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    train_bytes, held_bytes, files = corpus(args.data_commit, args.heldout_every)
    print(f"corpus at {args.data_commit[:10]}: {files}, {train_bytes.numel()} train bytes, "
          f"{held_bytes.numel()} held-out bytes", flush=True)
    model = build(args, args.loops)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params} parameters", flush=True)
    curve, train_seconds = train(model, train_bytes, args)
    model.eval()

    start = time.time()
    ids = windows(held_bytes, args.seq, args.eval_windows)
    result_fixed, fixed_argmax = evaluate(model, ids, args.eval_batch, exit="fixed")
    rows = []
    # prompts: the first prompt_len bytes of evenly spaced held-out windows
    picks = torch.linspace(0, ids.shape[0] - 1, args.prompts).round().long()
    prompts = ids[picks, :args.prompt_len].contiguous()
    for t in THRESHOLDS:
        frozen, frozen_argmax = evaluate(model, ids, args.eval_batch, threshold=t)
        every, every_argmax = evaluate(model, ids, args.eval_batch, threshold=t, every_loop=True)
        gen = agreement(model, prompts, args.new_tokens, t)
        rows.append({"threshold": t, "frozen": frozen, "every_loop": every,
                     "argmax_agreement": (frozen_argmax == every_argmax).double().mean().item(),
                     "generation": gen})
        print(f"threshold {t}: frozen {frozen['bits_per_byte']:.4f} bpb / {frozen['mean_exit_loop']:.3f} loops, "
              f"every_loop {every['bits_per_byte']:.4f} bpb / {every['mean_exit_loop']:.3f} loops, "
              f"gen identical {gen['identical_tokens']:.3f}", flush=True)
    # the same parameters unrolled 1, 2, 3, 4 loops for every token (how much each loop buys)
    fixed_k = []
    for k in range(1, args.loops + 1):
        unrolled = build(args, k)
        unrolled.load_state_dict(model.state_dict())
        unrolled.eval()
        fixed_k.append({"loops": k, **evaluate(unrolled, ids, args.eval_batch, exit="fixed")[0]})
    assert abs(fixed_k[-1]["bits_per_byte"] - result_fixed["bits_per_byte"]) < 1e-9
    eval_seconds = time.time() - start

    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    result = {
        "issue": 34,
        "command": "OMP_NUM_THREADS=1 python docs/study/ouro_freezing.py" + (
            " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty_tracked": dirty,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "config": {**vars(args), "parameters": params, "thresholds": list(THRESHOLDS),
                   "optimizer": "AdamW betas (0.9, 0.95), weight decay on matrices, grad clip 1.0, "
                                "linear warmup then cosine to lr/10",
                   "objective": "model.pondernet(ids, ones, beta, entropy=True) (Ouro's entropy-regularized "
                                "expected loss)",
                   "model_config": model.config.to_diff_dict()},
        "seeds": {"torch.manual_seed": args.seed, "random.seed": args.seed,
                  "batch sampler generator": args.seed + 1},
        "data": {"commit": args.data_commit, **files, "train_bytes": train_bytes.numel(),
                 "heldout_bytes": held_bytes.numel(), "eval_windows": ids.shape[0],
                 "eval_predictions": ids.shape[0] * (args.seq - 1),
                 "split": f"*.md and *.py at the data commit sorted by path, every {args.heldout_every}th file "
                          f"(index 0, {args.heldout_every}, ...) held out; eval on the first eval_windows "
                          "non-overlapping seq-byte windows of the held-out bytes, each window its own sequence, "
                          "next-byte predictions within the window (seq - 1 per window)"},
        "training": {"seconds": train_seconds, "curve": curve,
                     "start": curve[0], "end": curve[-1]},
        "eval_seconds": eval_seconds,
        "fixed": result_fixed,
        "fixed_k": fixed_k,
        "thresholds": rows,
        "generation_prompts": [bytes(p.tolist()).decode("utf-8", "replace") for p in prompts],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    redraw(result, Path(args.md))
    print(f"\ntrain {train_seconds:.0f}s, eval {eval_seconds:.0f}s; wrote {args.out} and {args.md}")


if __name__ == "__main__":
    main()
