"""Train an ACT network on one of the paper's synthetic tasks.

    python -m act_kernels.train parity                    # reduced size, CPU, minutes
    python -m act_kernels.train parity --size paper       # the paper's sizes (GPU)
    python -m act_kernels.train parity --fixed-steps      # the same network, one step
    python -m act_kernels.train pointer                   # per-token ACT transformer encoder
    python -m act_kernels.train pointer --fixed-steps 8   # the same layer at a fixed depth of 8
    python -m act_kernels.train lm                        # the looped ACT byte LM on real text (--help there)

Writes to --out (default runs/<task>[-fixed]): checkpoint.pt (at every
evaluation; --resume continues from it), summary.json (settings, final error,
ponder time per difficulty, timings) and summary.png (ponder steps and error
against difficulty).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from .common import Interrupt, machine, matplotlib_or_say_so
from .model import PonderNetTaskModel, TaskModel, TokenTaskModel, sequence_errors
from .tasks import TASKS, make_task


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m act_kernels.train", description=__doc__,
                                formatter_class=_HelpFormatter)
    p.add_argument("task", choices=sorted(TASKS), help="the task to train on (or lm: see "
                                                     "python -m act_kernels.train lm --help)")
    p.add_argument("--size", choices=["small", "paper"], default=None,
                   help="task and network size (None: paper on a GPU, small on the CPU)")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=INT",
                   help="override one task setting, e.g. --knob size=16 for parity")
    p.add_argument("--eval-knob", action="append", default=[], metavar="NAME=INT",
                   help="override a task setting for the final evaluation only, e.g. "
                        "--eval-knob max_nonzero=16 to test parity beyond the trained range")
    p.add_argument("--method", choices=["act", "pondernet"], default="act",
                   help="halting method: ACT (Graves 2016) or PonderNet (Banino et al. 2021; parity only)")
    p.add_argument("--cell", choices=["rnn", "gru", "lstm"], default=None,
                   help="recurrent cell of the ACT network (None: the paper's for the task)")
    p.add_argument("--beta", type=float, default=0.01, help="PonderNet: weight of the KL term")
    p.add_argument("--prior", type=float, default=0.2, help="PonderNet: lambda_p of the geometric prior")
    p.add_argument("--eval-halting", choices=["sample", "threshold"], default="sample",
                   help="PonderNet: how rows halt at evaluation")
    p.add_argument("--iterations", type=int, default=15000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=None, help="None: the paper's for the task")
    p.add_argument("--hidden", type=int, default=None,
                   help="network width (None: the paper's; small size: 64, parity 128)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (None: 1e-4 paper, 1e-3 small)")
    p.add_argument("--tau", type=float, default=1e-3, help="ACT's time penalty")
    p.add_argument("--max-steps", type=int, default=None,
                   help="M, the most ponder steps (None: the paper's for the task, at most 20 when small)")
    p.add_argument("--eps", type=float, default=0.01, help="halting epsilon (ACT and PonderNet)")
    p.add_argument("--fixed-steps", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="baseline: the same network with exactly K computation steps and no halting "
                        "(bare flag: K = 1; 0: off)")
    p.add_argument("--eval-every", type=int, default=250, help="iterations between evaluations and checkpoints")
    p.add_argument("--eval-batches", type=int, default=8,
                   help="batches per evaluation (the final one uses four times as many)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"],
                   help="kernel backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and of the training data")
    p.add_argument("--out", default=None, help="output folder (None: runs/<task>[-fixedK])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: one line per evaluation")
    return p.parse_args(argv)


def evaluate(model, task, batches, batch_size, generator, device):
    model.eval()
    errors, total = 0, 0
    by_difficulty = defaultdict(lambda: [0.0, 0, 0])   # ponder steps sum, count, wrong sequences
    seq_by_difficulty = defaultdict(lambda: [0, 0])
    pairs_d, pairs_n = [], []                          # (difficulty, steps) of every output, for Spearman
    tok_by_difficulty = defaultdict(lambda: [0, 0])    # wrong outputs, outputs (time steps with a target)
    with torch.no_grad():
        for _ in range(batches):
            batch = task.sample(batch_size, generator).to(device)
            out = model(batch)
            wrong = sequence_errors(out, batch)
            errors += int(wrong.sum())
            total += wrong.numel()
            valid = torch.arange(batch.inputs.shape[0], device=device)[:, None] < batch.lengths[None]
            # ponder against difficulty over the steps with a target (sort's input steps are left out)
            for d, n in zip(batch.difficulty[batch.mask].tolist(), out.steps[batch.mask].tolist()):
                by_difficulty[d][0] += n
                by_difficulty[d][1] += 1
                pairs_d.append(d)
                pairs_n.append(n)
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
    stats = dict(mean_steps_per_output=sum(pairs_n) / max(len(pairs_n), 1),
                 spearman_steps_difficulty=spearman(pairs_d, pairs_n))
    return errors / total, table, token_error, stats


def _ranks(values):
    """Ranks from 1, ties sharing their mean rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rank correlation of two equal-length sequences; None when
    either is constant (the correlation is undefined, e.g. fixed steps)."""
    rx, ry = _ranks(list(x)), _ranks(list(y))
    n = len(rx)
    if n < 2:
        return None
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def save_figure(path, task, table, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(ds, [table[d]["mean_steps"] for d in ds], "o-")
    axes[0].set_xlabel(task.difficulty_name)
    axes[0].set_ylabel("mean ponder steps N")
    axes[0].set_ylim(bottom=0)   # an honest axis: steps start at 0
    errs = [(d, table[d]["error"]) for d in ds if table[d]["error"] is not None]
    axes[1].plot([d for d, _ in errs], [100 * e for _, e in errs], "o-", color="C3")
    axes[1].set_xlabel(task.difficulty_name)
    axes[1].set_ylabel("sequence error (%)")
    axes[1].set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What must match for a checkpoint to continue this run.
_RESUME_KEYS = ("task", "size", "knobs", "method", "cell", "hidden", "max_steps", "fixed_steps", "batch_size")


def _resume(path, config, model, optimizer, generator, device):
    """Loads a checkpoint into the run; a corrupted file or one written for a
    different run is a SystemExit that names the file and what differs."""
    try:
        ckpt = torch.load(path, map_location=device)
        saved = ckpt["config"]
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same error for the user
        raise SystemExit(f"cannot resume from {path}: it is not a readable checkpoint ({type(exc).__name__}: "
                         f"{exc}); delete it or choose another --out") from None
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {config[k]!r} now"
              for k in _RESUME_KEYS if saved.get(k) != config[k]]
    if differ:
        raise SystemExit(f"cannot resume from {path}: it was written for a different run ("
                         + "; ".join(differ) + ")")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"].cpu())  # map_location moved it
    except (KeyError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"cannot resume from {path}: {exc}") from None
    return ckpt["iteration"], ckpt["history"]


def _knobs(items, flag):
    knobs = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"{flag} expects NAME=INT, got {item!r}")
        knobs[name] = int(value)
    return knobs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm"]:   # the language model has a command of its own
        from .lm import main as lm_main

        return lm_main(argv[1:])
    args = parse_args(argv)
    wall0 = time.time()
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
    else:
        model = TaskModel(task, hidden, max_steps=max_steps, eps=args.eps, backend=args.backend,
                          fixed_steps=args.fixed_steps, cell=args.cell or "").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_gen = torch.Generator().manual_seed(args.seed)
    config = dict(task=task.name, size=size, knobs=task.knobs, eval_knobs=eval_task.knobs, method=args.method,
                  beta=args.beta if args.method == "pondernet" else None,
                  prior=args.prior if args.method == "pondernet" else None,
                  cell="gru" if args.method == "pondernet" else (args.cell or task.cell), hidden=hidden,
                  batch_size=batch_size, lr=lr, tau=args.tau, max_steps=args.fixed_steps or max_steps,
                  eps=args.eps, fixed_steps=args.fixed_steps, iterations=args.iterations,
                  device=str(device), backend=args.backend, seed=args.seed)
    start, history = 0, []
    ckpt_path = out_dir / "checkpoint.pt"
    if args.resume:
        if ckpt_path.exists():
            start, history = _resume(ckpt_path, config, model, optimizer, train_gen, device)
            print(f"resuming {ckpt_path} at iteration {start}")
        else:
            print(f"--resume: no checkpoint at {ckpt_path}; starting from iteration 0")
    can_plot = matplotlib_or_say_so()

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
    log_path = out_dir / "log.jsonl"

    def save(iteration):
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                        generator=train_gen.get_state(), iteration=iteration, history=history, config=config),
                   ckpt_path)

    with Interrupt() as interrupt:
        for it in progress:
            batch = task.sample(batch_size, train_gen).to(device)
            loss = model.loss(batch, args.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
                err, table, token_err, _ = evaluate(model, task, args.eval_batches, batch_size,
                                                 torch.Generator().manual_seed(eval_gen_seed), device)
                mean_steps = sum(v["mean_steps"] for v in table.values()) / max(len(table), 1)
                record = dict(iteration=it + 1, loss=loss.item(), error=err, token_error=token_err,
                              mean_steps=mean_steps, seconds=time.time() - t0)
                history.append(record)
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                msg = (f"it {it + 1}: loss {loss.item():.4f}  sequence error {100 * err:.1f} %  "
                       f"mean N {mean_steps:.2f}")
                if bar is not None:
                    bar.set_postfix(err=f"{100 * err:.1f}%", N=f"{mean_steps:.2f}")
                    bar.write(msg)
                else:
                    print(msg, flush=True)
                save(it + 1)
            if interrupt.requested:
                save(it + 1)
                if bar is not None:
                    bar.close()
                print(f"interrupted at iteration {it + 1}: saved {ckpt_path}; continue with the same "
                      "command and --resume", flush=True)
                raise SystemExit(130)

    final_err, table, final_token_err, stats = evaluate(model, eval_task, 4 * args.eval_batches, batch_size,
                                torch.Generator().manual_seed(eval_gen_seed + 1), device)
    summary = dict(config=config, final_sequence_error=final_err, final_token_error=final_token_err,
                   mean_ponder_steps=sum(v["mean_steps"] for v in table.values()) / max(len(table), 1),
                   **stats, by_difficulty=table, history=history, train_seconds=time.time() - t0,
                   wall_seconds=time.time() - wall0, machine=machine(), torch=torch.__version__)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    kind = (f"{args.fixed_steps} fixed step{'s' if args.fixed_steps > 1 else ''}" if args.fixed_steps
            else f"PonderNet, beta={args.beta}, prior={args.prior}" if args.method == "pondernet"
            else f"ACT, tau={args.tau}")
    wrote = "summary.json"
    if can_plot:
        save_figure(out_dir / "summary.png", task, table,
                    f"{task.name} ({size}), {kind}: error {100 * final_err:.1f} %")
        wrote += " and summary.png"
    print(f"final sequence error {100 * final_err:.2f} %; wrote {out_dir}/{wrote}")
    return summary

