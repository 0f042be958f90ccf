"""Train the looped ACT language model on real text, bytes as tokens.

    python -m act_kernels.train lm                        # the Python standard library's own sources
    python -m act_kernels.train lm --corpus FILE          # any text file
    python -m act_kernels.train lm --fixed-steps 3        # the same model at a fixed depth of 3
    python -m act_kernels.train lm --tau 0.01             # a larger time penalty

The default corpus is the .py files of the running interpreter's standard
library (sysconfig.get_paths()["stdlib"]), read in sorted order up to
--corpus-bytes; every tenth file is held out. Writes to --out (default
runs/lm[-fixedK]): log.jsonl (every evaluation), checkpoint.pt (--resume
continues from it; Ctrl-C saves it and exits), summary.json (held-out bits
per byte, mean steps, steps by byte class, settings, timings) and
summary.png (steps by byte class). It ends by printing a sample from
`generate`.
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..nn import ACTLanguageModel
from .common import Interrupt, machine, matplotlib_or_say_so

BYTE_CLASSES = ("line start", "indentation", "identifier", "digit", "in string", "punctuation", "space", "comment")


def read_corpus(path: str, limit: int) -> Tuple[bytes, bytes, str]:
    """(train bytes, held-out bytes, description). A file: its last tenth is
    held out. The standard library: every tenth .py file (sorted) is held out."""
    if path:
        data = Path(path).read_bytes()[:limit]
        if len(data) < 1000:
            raise SystemExit(f"--corpus {path}: {len(data)} bytes is too little text to train on")
        cut = len(data) * 9 // 10
        return data[:cut], data[cut:], f"{path} ({len(data)} bytes)"
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held, total = [], [], 0
    for k, f in enumerate(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)):
        try:
            text = f.read_bytes()
        except OSError:
            continue
        (held if k % 10 == 9 else train).append(text)
        total += len(text)
        if total >= limit:
            break
    return b"\n".join(train), b"\n".join(held), f"Python {sysconfig.get_python_version()} stdlib ({total} bytes)"


def byte_classes(data: bytes) -> torch.Tensor:
    """The class (index into BYTE_CLASSES) of every byte of Python-like text:
    the first byte of a line, its leading whitespace, identifier characters,
    digits, bytes inside a string literal, other punctuation, other spaces,
    and comments (from # to the line end). String literals are followed with
    a simple quote scanner that resets at each line end outside triple
    quotes."""
    out = []
    line_start, leading, quote, comment = True, True, None, False
    i = 0
    while i < len(data):
        c = chr(data[i])
        if comment and not line_start:
            out.append(7)
            comment = c != "\n"
            line_start = c == "\n"
            leading = line_start
            i += 1
            continue
        comment = False
        if quote is not None:
            out.append(4)
            if data.startswith(quote.encode(), i):
                out.extend([4] * (len(quote) - 1))
                i += len(quote)
                quote = None
                continue
            if c == "\n" and len(quote) == 1:
                quote = None
                line_start, leading = True, True
            i += 1
            continue
        if line_start:
            out.append(0)
            leading = c in " \t"
        elif leading and c in " \t":
            out.append(1)
        elif c in "'\"":
            quote = c * 3 if data.startswith((c * 3).encode(), i) else c
            out.extend([4] * len(quote))
            i += len(quote)
            line_start = leading = False
            continue
        elif c.isalpha() or c == "_":
            out.append(2)
        elif c.isdigit():
            out.append(3)
        elif c == "#":
            out.append(7)
            comment = True
        elif c.isspace():
            out.append(6)
        else:
            out.append(5)
        if not (leading and c in " \t"):
            leading = False
        line_start = c == "\n"
        i += 1
    return torch.tensor(out[:len(data)], dtype=torch.int64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m act_kernels.train lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="", help="a text file (default: the Python standard library's sources)")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="read at most this many bytes")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-layers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--fixed-steps", type=int, default=0, metavar="K",
                   help="baseline: the block applied exactly K times, no halting (0: ACT)")
    p.add_argument("--tau", type=float, default=0.01, help="ACT's time penalty")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--context", type=int, default=64, help="training window in bytes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/lm[-fixedK])")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sample-bytes", type=int, default=160, help="length of the closing sample")
    args = p.parse_args(argv)
    if args.fixed_steps < 0 or args.fixed_steps > 64:
        raise SystemExit(f"--fixed-steps must lie in [0, 64], got {args.fixed_steps}")
    return args


def build_model(args, device) -> ACTLanguageModel:
    steps = args.fixed_steps or args.max_steps
    model = ACTLanguageModel(256, args.d_model, args.heads, max_steps=steps, eps=args.eps,
                             block_layers=args.block_layers, max_len=max(args.context, args.sample_bytes + 64),
                             halting_bias_init=-1.0 if not args.fixed_steps else -40.0, backend=args.backend)
    if args.fixed_steps:
        # a fixed depth K: a halting unit that never halts before step K (h = sigmoid(-40),
        # so p^K = 1 - (K - 1) 4e-18 and every earlier p is 4e-18), trained no further
        with torch.no_grad():
            model.block.halting.weight.zero_()
        model.block.halting.requires_grad_(False)
    return model.to(device)


def windows(data: torch.Tensor, count: int, length: int, generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=generator)
    return torch.stack([data[s:s + length + 1] for s in starts.tolist()])


def evaluate(model, held: torch.Tensor, classes: torch.Tensor, args, device) -> Dict:
    """Held-out bits per byte and ponder steps, overall and by byte class, on
    fixed windows (the same every evaluation)."""
    model.eval()
    g = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, held.numel() - args.context - 1, (args.eval_windows,), generator=g).tolist()
    nll, count = 0.0, 0
    steps_by = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64)
    count_by = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(starts), args.batch_size):
            chunk = starts[i:i + args.batch_size]
            batch = torch.stack([held[s:s + args.context + 1] for s in chunk]).to(device)
            cls = torch.stack([classes[s:s + args.context] for s in chunk])
            logits = model(batch[:, :-1])
            nll += float(F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
            steps = model.steps.cpu().double()
            steps_by.index_add_(0, cls.reshape(-1), steps.reshape(-1))
            count_by.index_add_(0, cls.reshape(-1), torch.ones_like(steps.reshape(-1)))
    model.train()
    return dict(bits_per_byte=nll / count / math.log(2), mean_steps=float(steps_by.sum() / count_by.sum()),
                steps_by_class={name: (float(steps_by[k] / count_by[k]) if count_by[k] else None)
                                for k, name in enumerate(BYTE_CLASSES)},
                bytes_by_class={name: int(count_by[k]) for k, name in enumerate(BYTE_CLASSES)})


def sample(model, args, device) -> str:
    prompt = torch.tensor(list(b"def "), dtype=torch.int64, device=device)
    out = model.generate([prompt], args.sample_bytes, temperature=0.8, top_k=40,
                         generator=torch.Generator(device=device).manual_seed(args.seed))
    return bytes(out.sequences[0].tolist()).decode("utf-8", errors="replace")


def save_figure(path: Path, result: Dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in BYTE_CLASSES if result["steps_by_class"][n] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(names, [result["steps_by_class"][n] for n in names], color="C0")
    ax.set_ylabel("mean ponder steps")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What must match for a checkpoint to continue a run (more --iterations may differ).
_RESUME_KEYS = ("corpus", "corpus_bytes", "d_model", "heads", "block_layers", "max_steps", "fixed_steps", "tau",
                "eps", "context", "batch_size", "lr", "seed")


def main(argv=None):
    args = parse_args(argv)
    wall0 = time.time()
    device = torch.device(args.device)
    train_bytes, held_bytes, described = read_corpus(args.corpus, args.corpus_bytes)
    train = torch.tensor(list(train_bytes), dtype=torch.int64)
    held = torch.tensor(list(held_bytes), dtype=torch.int64)
    classes = byte_classes(held_bytes)
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    out_dir = Path(args.out or ("runs/lm" + (f"-fixed{args.fixed_steps}" if args.fixed_steps else "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")}
    config["corpus"] = described
    gen = torch.Generator().manual_seed(args.seed)
    start, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        differ = [f"{k}: {state['config'].get(k)!r} there, {config[k]!r} now" for k in _RESUME_KEYS
                  if state["config"].get(k) != config[k]]
        if differ:
            raise SystemExit(f"cannot resume from {ckpt}: it was written for different settings (" +
                             "; ".join(differ) + ")")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        start, history = state["iteration"], state["history"]
        print(f"resuming {ckpt} at iteration {start}")
    can_plot = matplotlib_or_say_so()
    print(json.dumps(config), flush=True)

    def save(iteration):
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), generator=gen.get_state(),
                        iteration=iteration, history=history, config=config), ckpt)

    t0 = time.time()
    with Interrupt() as interrupt:
        for it in range(start, args.iterations):
            batch = windows(train, args.batch_size, args.context, gen).to(device)
            logits = model(batch[:, :-1])
            task = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
            loss = task + (0.0 if args.fixed_steps else args.tau) * model.ponder_cost.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
                result = evaluate(model, held, classes, args, device)
                record = dict(iteration=it + 1, train_bits_per_byte=task.item() / math.log(2),
                              bits_per_byte=result["bits_per_byte"], mean_steps=result["mean_steps"],
                              seconds=time.time() - t0)
                history.append(record)
                with (out_dir / "log.jsonl").open("a") as log:
                    log.write(json.dumps(record) + "\n")
                print(f"it {it + 1}: held-out {record['bits_per_byte']:.3f} bits/byte, "
                      f"mean steps {record['mean_steps']:.2f}", flush=True)
                save(it + 1)
            if interrupt.requested:
                save(it + 1)
                print(f"interrupted at iteration {it + 1}: saved {ckpt}; continue with the same command and "
                      "--resume", flush=True)
                raise SystemExit(130)
    result = evaluate(model, held, classes, args, device)
    text = sample(model, args, device)
    summary = dict(config=config, **result, history=history, train_seconds=time.time() - t0,
                   wall_seconds=time.time() - wall0, sample=text, machine=machine(), torch=torch.__version__)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if can_plot:
        kind = f"fixed {args.fixed_steps} steps" if args.fixed_steps else f"ACT, tau={args.tau}"
        save_figure(out_dir / "summary.png", result, f"byte LM on {described}, {kind}: "
                    f"{result['bits_per_byte']:.3f} bits/byte, mean steps {result['mean_steps']:.2f}")
    print(f"held-out {result['bits_per_byte']:.3f} bits per byte, mean steps {result['mean_steps']:.2f}; "
          f"wrote {out_dir}/summary.json")
    print("sample:\n" + text)
    return summary


__all__ = ["main", "parse_args", "read_corpus", "byte_classes", "BYTE_CLASSES"]
