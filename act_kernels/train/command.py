"""Train an ACT network on one of the paper's synthetic tasks.

    python -m act_kernels.train parity                    # reduced size, CPU, minutes
    python -m act_kernels.train parity --size paper       # the paper's sizes (GPU)
    python -m act_kernels.train parity --fixed-steps      # the same network, one step
    python -m act_kernels.train pointer                   # per-token ACT transformer encoder
    python -m act_kernels.train pointer --fixed-steps 8   # the same layer at a fixed depth of 8

Writes to --out (default runs/<task>[-fixed]): checkpoint.pt (at every
evaluation; --resume continues from it), summary.json (settings, final error,
ponder time per difficulty, timings) and summary.png (ponder steps and error
against difficulty).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from .model import PonderNetTaskModel, TaskModel, TokenTaskModel, sequence_errors
from .tasks import TASKS, make_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m act_kernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--size", choices=["small", "paper"], default=None,
                   help="task and network size (default: paper on a GPU, small on the CPU)")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=INT",
                   help="override one task setting, e.g. --knob size=16 for parity")
    p.add_argument("--eval-knob", action="append", default=[], metavar="NAME=INT",
                   help="override a task setting for the final evaluation only, e.g. "
                        "--eval-knob max_nonzero=16 to test parity beyond the trained range")
    p.add_argument("--method", choices=["act", "pondernet"], default="act",
                   help="halting method: ACT (Graves 2016) or PonderNet (Banino et al. 2021; parity only)")
    p.add_argument("--cell", choices=["rnn", "gru", "lstm"], default=None,
                   help="recurrent cell of the ACT network (default: the paper's for the task)")
    p.add_argument("--beta", type=float, default=0.01, help="PonderNet: weight of the KL term")
    p.add_argument("--prior", type=float, default=0.2, help="PonderNet: lambda_p of the geometric prior")
    p.add_argument("--eval-halting", choices=["sample", "threshold"], default="sample",
                   help="PonderNet: how rows halt at evaluation")
    p.add_argument("--iterations", type=int, default=15000)
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's for the task")
    p.add_argument("--hidden", type=int, default=None, help="default: the paper's (small: 64, parity 128)")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (paper), 1e-3 (small)")
    p.add_argument("--tau", type=float, default=1e-3, help="time penalty")
    p.add_argument("--max-steps", type=int, default=None, help="M (default: the paper's for the task)")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--fixed-steps", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="baseline: the same network with exactly K computation steps and no halting "
                        "(bare flag: K = 1; K > 1 for the transformer task)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def evaluate(model, task, batches, batch_size, generator, device):
    model.eval()
    errors, total = 0, 0
    by_difficulty = defaultdict(lambda: [0.0, 0, 0])   # ponder steps sum, count, wrong sequences
    seq_by_difficulty = defaultdict(lambda: [0, 0])
    tok_by_difficulty = defaultdict(lambda: [0, 0])    # wrong outputs, outputs (time steps with a target)
    with torch.no_grad():
        for _ in range(batches):
            batch = task.sample(batch_size, generator).to(device)
            out = model(batch)
            wrong = sequence_errors(out, batch)
            errors += int(wrong.sum())
            total += wrong.numel()
            valid = torch.arange(batch.inputs.shape[0], device=device)[:, None] < batch.lengths[None]
            for d, n in zip(batch.difficulty[valid].tolist(), out.steps[valid].tolist()):
                by_difficulty[d][0] += n
                by_difficulty[d][1] += 1
            token_wrong = (out.logits.argmax(-1) != batch.targets).any(-1)
            for d, w in zip(batch.difficulty[batch.mask].tolist(), token_wrong[batch.mask].tolist()):
                tok_by_difficulty[d][0] += int(w)
                tok_by_difficulty[d][1] += 1
            # a sequence's difficulty: its largest per-step difficulty
            seq_d = (batch.difficulty * valid).max(0).values
            for d, w in zip(seq_d.tolist(), wrong.tolist()):
                seq_by_difficulty[d][0] += int(w)
                seq_by_difficulty[d][1] += 1
    model.train()
    table = {
        int(d): dict(mean_steps=s / c, error=seq_by_difficulty[d][0] / max(seq_by_difficulty[d][1], 1)
                     if d in seq_by_difficulty else None,
                     token_error=tok_by_difficulty[d][0] / tok_by_difficulty[d][1] if d in tok_by_difficulty else None)
        for d, (s, c, _) in sorted(by_difficulty.items())
    }
    tokens = sum(c for _, c in tok_by_difficulty.values())
    token_error = sum(w for w, _ in tok_by_difficulty.values()) / max(tokens, 1)
    return errors / total, table, token_error


def save_figure(path, task, table, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(ds, [table[d]["mean_steps"] for d in ds], "o-")
    axes[0].set_xlabel(task.difficulty_name)
    axes[0].set_ylabel("mean ponder steps N")
    errs = [(d, table[d]["error"]) for d in ds if table[d]["error"] is not None]
    axes[1].plot([d for d, _ in errs], [100 * e for _, e in errs], "o-", color="C3")
    axes[1].set_xlabel(task.difficulty_name)
    axes[1].set_ylabel("sequence error (%)")
    axes[1].set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _knobs(items, flag):
    knobs = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"{flag} expects NAME=INT, got {item!r}")
        knobs[name] = int(value)
    return knobs


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("paper" if device.type == "cuda" else "small")
    knobs, eval_knobs = _knobs(args.knob, "--knob"), _knobs(args.eval_knob, "--eval-knob")
    task = make_task(args.task, size, **knobs)
    eval_task = make_task(args.task, size, **{**knobs, **eval_knobs}) if eval_knobs else task
    small = size == "small"
    hidden = args.hidden or (task.hidden if not small else (128 if task.name == "parity" else 64))
    batch_size = args.batch_size or task.batch_size
    lr = args.lr or (1e-3 if small else 1e-4)
    max_steps = args.max_steps or (task.max_steps if not small else min(task.max_steps, 20))
    suffix = "" if not args.fixed_steps else ("-fixed" if args.fixed_steps == 1 else f"-fixed{args.fixed_steps}")
    out_dir = Path(args.out or f"runs/{task.name}{suffix}")
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    if args.fixed_steps < 0:
        raise SystemExit(f"--fixed-steps must be >= 1, got {args.fixed_steps}")
    if args.method == "pondernet":
        if task.name != "parity" or args.fixed_steps:
            raise SystemExit("--method pondernet is wired for parity, without --fixed-steps")
        model = PonderNetTaskModel(task, hidden, max_steps=max_steps, eps=args.eps, backend=args.backend,
                                   prior=args.prior, beta=args.beta, eval_halting=args.eval_halting).to(device)
    elif task.cell == "transformer":
        model = TokenTaskModel(task, hidden, max_steps=max_steps, eps=args.eps, backend=args.backend,
                               fixed_steps=args.fixed_steps).to(device)
    elif args.fixed_steps > 1:
        raise SystemExit("--fixed-steps K > 1 is only available for the transformer task (pointer)")
    else:
        model = TaskModel(task, hidden, max_steps=max_steps, eps=args.eps, backend=args.backend,
                          fixed_steps=bool(args.fixed_steps), cell=args.cell or "").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_gen = torch.Generator().manual_seed(args.seed)
    start = 0
    history = []
    ckpt_path = out_dir / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_gen.set_state(ckpt["generator"].cpu())  # map_location moved it
        start, history = ckpt["iteration"], ckpt["history"]

    config = dict(task=task.name, size=size, knobs=task.knobs, eval_knobs=eval_task.knobs, method=args.method,
                  beta=args.beta if args.method == "pondernet" else None,
                  prior=args.prior if args.method == "pondernet" else None,
                  cell="gru" if args.method == "pondernet" else (args.cell or task.cell), hidden=hidden,
                  batch_size=batch_size, lr=lr, tau=args.tau, max_steps=args.fixed_steps or max_steps,
                  eps=args.eps, fixed_steps=args.fixed_steps, iterations=args.iterations,
                  device=str(device), backend=args.backend, seed=args.seed)
    print(json.dumps(config))
    progress = range(start, args.iterations)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(progress, initial=start, total=args.iterations, desc=task.name)
            progress = bar
        except ImportError:
            pass

    t0 = time.time()
    eval_gen_seed = 10_000 + args.seed
    for it in progress:
        batch = task.sample(batch_size, train_gen).to(device)
        loss = model.loss(batch, args.tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
            err, table, token_err = evaluate(model, task, args.eval_batches, batch_size,
                                  torch.Generator().manual_seed(eval_gen_seed), device)
            mean_steps = sum(v["mean_steps"] for v in table.values()) / max(len(table), 1)
            history.append(dict(iteration=it + 1, loss=loss.item(), error=err, token_error=token_err,
                                mean_steps=mean_steps,
                                seconds=time.time() - t0))
            msg = f"it {it + 1}: loss {loss.item():.4f}  sequence error {100 * err:.1f} %  mean N {mean_steps:.2f}"
            if bar is not None:
                bar.set_postfix(err=f"{100 * err:.1f}%", N=f"{mean_steps:.2f}")
                bar.write(msg)
            else:
                print(msg, flush=True)
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                            generator=train_gen.get_state(), iteration=it + 1, history=history, config=config),
                       ckpt_path)

    final_err, table, final_token_err = evaluate(model, eval_task, 4 * args.eval_batches, batch_size,
                                torch.Generator().manual_seed(eval_gen_seed + 1), device)
    summary = dict(config=config, final_sequence_error=final_err, final_token_error=final_token_err,
                   mean_ponder_steps=sum(v["mean_steps"] for v in table.values()) / max(len(table), 1),
                   by_difficulty=table, history=history, train_seconds=time.time() - t0,
                   torch=torch.__version__)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    kind = (f"{args.fixed_steps} fixed step{'s' if args.fixed_steps > 1 else ''}" if args.fixed_steps
            else f"PonderNet, beta={args.beta}, prior={args.prior}" if args.method == "pondernet"
            else f"ACT, tau={args.tau}")
    save_figure(out_dir / "summary.png", task, table, f"{task.name} ({size}), {kind}: error {100 * final_err:.1f} %")
    print(f"final sequence error {100 * final_err:.2f} %; wrote {out_dir}/summary.json and summary.png")
    return summary

