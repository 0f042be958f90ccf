"""Train the looped ACT language model on real text, bytes as tokens.

    python -m act_kernels.train lm                        # the Python standard library's own sources
    python -m act_kernels.train lm --corpus FILE          # any text file
    python -m act_kernels.train lm --fixed-steps 3        # the same model at a fixed depth of 3
    python -m act_kernels.train lm --tau 0.01             # a larger time penalty
    python -m act_kernels.train lm --arch llama           # a transformers Llama, layers [1, 3) of 4 looped with ACT
    python -m act_kernels.train lm --arch qwen3 --layers 6 --block 2 4
    python -m act_kernels.train lm --arch llama --plain   # the Llama without a loop (save_pretrained)
    python -m act_kernels.train lm --retrofit runs/lm-llama-plain --block 1 3   # loop a trained plain model

The default corpus is the .py files of the running interpreter's standard
library (sysconfig.get_paths()["stdlib"]), read in sorted order up to
--corpus-bytes; every tenth file is held out. Writes to --out (default
runs/lm[-fixedK]): log.jsonl (every evaluation), checkpoint.pt (--resume
continues from it; Ctrl-C saves it and exits), summary.json (held-out bits
per byte, mean steps, steps by byte class, settings, timings) and
summary.png (steps by byte class). It ends by printing a sample from
`generate`.

--arch act (the default) is `ak.nn.ACTLanguageModel`. --arch llama | qwen3
builds a transformers LlamaForCausalLM / Qwen3ForCausalLM from a config
(vocabulary 256, --layers decoder layers of --d-model with --heads query and
--kv-heads key/value heads, SwiGLU width --intermediate) and ponders its layers
--block A B (default: all but the first and the last) with ACT through
`act_kernels.hf.LoopedCausalLM`; the loss is transformers' causal-LM loss
plus tau times the mean ponder cost. --plain trains the same model without
a loop. --retrofit DIR loads the model a --plain run saved in DIR and loops
its layers --block A B (with --plain: keeps training it plain, the control).
These runs also save the trained model into --out: transformers'
save_pretrained (--plain), LoopedCausalLM.save_pretrained (the loop, read
back by LoopedCausalLM.from_pretrained). They need transformers:
pip install -e ".[hf]".
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

ARCHS = ("act", "llama", "qwen3")
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
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="act: ACTLanguageModel; llama, qwen3: a transformers model looped by LoopedCausalLM "
                        "(default: act, or the --retrofit model's)")
    p.add_argument("--layers", type=int, default=None, help="llama, qwen3: decoder layers (default 4)")
    p.add_argument("--block", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="llama, qwen3: ponder decoder layers [A, B) (default: all but the first and the last)")
    p.add_argument("--kv-heads", type=int, default=2, help="llama, qwen3: key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=0,
                   help="llama, qwen3: MLP width (0: 8/3 d_model up to a multiple of 8, the parameters of "
                        "ACTLanguageModel's 4 d_model GELU MLP)")
    p.add_argument("--plain", action="store_true",
                   help="llama, qwen3: train the transformers model without a loop (every layer once)")
    p.add_argument("--retrofit", default=None, metavar="DIR",
                   help="start from the transformers model a --plain run saved in DIR and loop its layers --block "
                        "with ACT (with --plain: keep training it plain)")
    p.add_argument("--halting-bias", type=float, default=None,
                   help="the halting unit's initial bias (default -1 with ACT, -40 with --fixed-steps)")
    p.add_argument("--halting", default="act", choices=["act", "pondernet"],
                   help="llama, qwen3: act (ACT's mean field and ponder cost) or pondernet (the per-token PonderNet "
                        "objective that trains the halting unit as an exit gate, design §16; the block must be the "
                        "model's last layers, and evaluation reads the gate at --exit-threshold)")
    p.add_argument("--beta", type=float, default=0.01, help="pondernet: the weight of the KL (or entropy) term")
    p.add_argument("--prior", type=float, default=0.2, help="pondernet: the geometric prior's lambda_p")
    p.add_argument("--entropy", action="store_true", help="pondernet: Ouro's entropy bonus instead of the KL")
    p.add_argument("--exit-threshold", type=float, default=0.5,
                   help="pondernet: the gate's exit mass at evaluation and sampling (exit='gate')")
    p.add_argument("--sample-depth", action="store_true",
                   help="llama, qwen3 with --fixed-steps K: every training batch runs a depth drawn uniformly "
                        "from 1..K (as Huginn trains); evaluation runs K")
    args = p.parse_args(argv)
    if args.fixed_steps < 0 or args.fixed_steps > 64:
        raise SystemExit(f"--fixed-steps must lie in [0, 64], got {args.fixed_steps}")
    if args.halting == "pondernet" and (args.fixed_steps or args.plain):
        raise SystemExit("--halting pondernet trains the halting unit: not with --fixed-steps or --plain")
    if args.sample_depth and not args.fixed_steps:
        raise SystemExit("--sample-depth draws each batch's depth up to --fixed-steps K: give --fixed-steps")
    if args.arch is None:
        args.arch = None if args.retrofit else "act"
    if args.arch == "act":
        given = [flag for flag, value in (("--layers", args.layers), ("--block", args.block), ("--plain", args.plain),
                                          ("--retrofit", args.retrofit), ("--sample-depth", args.sample_depth),
                                          ("--halting pondernet", args.halting == "pondernet")) if value]
        if given:
            raise SystemExit(f"{', '.join(given)}: only with --arch llama or qwen3 (ACTLanguageModel's block is "
                             "--block-layers)")
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


class ACTRunner:
    """ACTLanguageModel behind what the training loop needs (the interface of
    transformers_lm.TransformersRunner): `module`, `__call__(batch)` on
    windows (B, C + 1) -> (logits (B, C, 256), loss, ponder cost (B, C),
    steps (B, C)), `sample`, `save` (nothing: checkpoint.pt holds it) and the
    layer applications per token."""

    def __init__(self, args, device):
        self.module = build_model(args, device)
        self.settings, self.block_layers = {}, args.block_layers

    def __call__(self, batch):
        out = self.module(batch[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        return out.logits, loss, out.ponder_cost, out.steps

    def layer_applications(self, mean_steps: float) -> float:
        return 2 + self.block_layers * mean_steps   # prelude and coda, one layer each

    def sample(self, prompt, new: int, seed: int, device):
        out = self.module.generate(prompt[None], max_new_tokens=new, do_sample=True, temperature=0.8, top_k=40,
                                   generator=torch.Generator(device=device).manual_seed(seed))
        return out[0]

    def save(self, directory):
        return None


def windows(data: torch.Tensor, count: int, length: int, generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=generator)
    return torch.stack([data[s:s + length + 1] for s in starts.tolist()])


def evaluate(runner, held: torch.Tensor, classes: torch.Tensor, args, device) -> Dict:
    """Held-out bits per byte and ponder steps, overall and by byte class, on
    fixed windows (the same every evaluation)."""
    model = runner.module
    model.eval()
    g = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, held.numel() - args.context - 1, (args.eval_windows,), generator=g).tolist()
    nll, count = 0.0, 0
    steps_by = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64)
    count_by = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64)
    nll_by = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(starts), args.batch_size):
            chunk = starts[i:i + args.batch_size]
            batch = torch.stack([held[s:s + args.context + 1] for s in chunk]).to(device)
            cls = torch.stack([classes[s:s + args.context] for s in chunk])
            logits, _, _, steps = runner(batch)
            token_nll = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="none")
            nll += float(token_nll.sum())
            count += batch[:, 1:].numel()
            steps = steps.cpu().double()
            steps_by.index_add_(0, cls.reshape(-1), steps.reshape(-1))
            count_by.index_add_(0, cls.reshape(-1), torch.ones_like(steps.reshape(-1)))
            nll_by.index_add_(0, cls.reshape(-1), token_nll.cpu().double())
    model.train()
    mean_steps = float(steps_by.sum() / count_by.sum())
    return dict(bits_per_byte=nll / count / math.log(2), mean_steps=mean_steps,
                layer_applications=runner.layer_applications(mean_steps),
                steps_by_class={name: (float(steps_by[k] / count_by[k]) if count_by[k] else None)
                                for k, name in enumerate(BYTE_CLASSES)},
                bytes_by_class={name: int(count_by[k]) for k, name in enumerate(BYTE_CLASSES)},
                # the bits of the byte the model predicts after a byte of this class
                bits_per_byte_by_class={name: (float(nll_by[k] / count_by[k]) / math.log(2) if count_by[k] else None)
                                        for k, name in enumerate(BYTE_CLASSES)})


def sample(runner, args, device) -> str:
    prompt = torch.tensor(list(b"def "), dtype=torch.int64, device=device)
    out = runner.sample(prompt, args.sample_bytes, args.seed, device)
    return bytes(out.tolist()).decode("utf-8", errors="replace")


def save_figure(path: Path, result: Dict, title: str, key: str = "steps_by_class",
                ylabel: str = "mean ponder steps") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in BYTE_CLASSES if result[key][n] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(names, [result[key][n] for n in names], color="C0")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What must match for a checkpoint to continue a run (more --iterations may differ).
_RESUME_KEYS = ("corpus", "corpus_bytes", "d_model", "heads", "block_layers", "max_steps", "fixed_steps", "tau",
                "eps", "context", "batch_size", "lr", "seed", "arch", "halting_bias")
_HF_RESUME_KEYS = ("layers", "block", "kv_heads", "intermediate", "plain", "retrofit", "halting", "beta", "prior",
                   "entropy", "sample_depth")
_HF_ONLY = _HF_RESUME_KEYS + ("exit_threshold",)
_ACT_ONLY = ("block_layers",)
# what a checkpoint written before these settings existed ran with
_OLD_DEFAULTS = dict(arch="act", halting_bias=None, halting="act", beta=0.01, prior=0.2, entropy=False,
                     sample_depth=False)


def _default_out(args) -> str:
    if args.arch == "act":
        return "runs/lm" + (f"-fixed{args.fixed_steps}" if args.fixed_steps else "")
    if args.plain:
        kind = "-plain-continued" if args.retrofit else "-plain"
    else:
        kind = ("-retrofit" if args.retrofit else "") + (f"-fixed{args.fixed_steps}" if args.fixed_steps else "")
    return f"runs/lm-{args.arch}{kind}"


def _kind(args) -> str:
    if args.plain:
        return "plain" + (", continued" if args.retrofit else "")
    what = f"fixed {args.fixed_steps} steps" if args.fixed_steps else f"ACT, tau={args.tau}"
    if args.arch == "act":
        return what
    return f"{'retrofitted, ' if args.retrofit else ''}layers [{args.block[0]}, {args.block[1]}) {what}"


def main(argv=None):
    args = parse_args(argv)
    wall0 = time.time()
    device = torch.device(args.device)
    hf = args.arch != "act"
    if hf:   # transformers only when asked for; a bad --block or --retrofit is refused here, before anything runs
        from . import transformers_lm

        transformers_lm.resolve(args)
    train_bytes, held_bytes, described = read_corpus(args.corpus, args.corpus_bytes)
    train = torch.tensor(list(train_bytes), dtype=torch.int64)
    held = torch.tensor(list(held_bytes), dtype=torch.int64)
    classes = byte_classes(held_bytes)
    torch.manual_seed(args.seed)
    runner = transformers_lm.TransformersRunner(args, device) if hf else ACTRunner(args, device)
    model = runner.module
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    out_dir = Path(args.out or _default_out(args))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out") and k not in (_ACT_ONLY if hf else _HF_ONLY)}
    config["corpus"] = described
    config.update(runner.settings)
    resume_keys = _RESUME_KEYS + (_HF_RESUME_KEYS if hf else ())
    gen = torch.Generator().manual_seed(args.seed)
    start, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        saved = state["config"]
        differ = [f"{k}: {saved.get(k, _OLD_DEFAULTS.get(k))!r} there, {config.get(k)!r} now" for k in resume_keys
                  if saved.get(k, _OLD_DEFAULTS.get(k)) != config.get(k)]
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

    def log(record):
        history.append(record)
        with (out_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"it {record['iteration']}: held-out {record['bits_per_byte']:.3f} bits/byte, "
              f"mean steps {record['mean_steps']:.2f}", flush=True)

    if args.retrofit and start == 0:   # where the loaded model starts, before a step of training
        result = evaluate(runner, held, classes, args, device)
        log(dict(iteration=0, train_bits_per_byte=None, bits_per_byte=result["bits_per_byte"],
                 mean_steps=result["mean_steps"], seconds=0.0))
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)   # a resumed run counts its earlier time
    with Interrupt() as interrupt:
        for it in range(start, args.iterations):
            batch = windows(train, args.batch_size, args.context, gen).to(device)
            _, task, cost, _ = runner(batch)
            loss = task if cost is None else task + (0.0 if args.fixed_steps else args.tau) * cost.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
                result = evaluate(runner, held, classes, args, device)
                log(dict(iteration=it + 1, train_bits_per_byte=task.item() / math.log(2),
                         bits_per_byte=result["bits_per_byte"], mean_steps=result["mean_steps"],
                         seconds=time.time() - t0))
                save(it + 1)
            if interrupt.requested:
                save(it + 1)
                print(f"interrupted at iteration {it + 1}: saved {ckpt}; continue with the same command and "
                      "--resume", flush=True)
                raise SystemExit(130)
    train_seconds = time.time() - t0
    result = evaluate(runner, held, classes, args, device)
    text = sample(runner, args, device)
    saved_as = runner.save(out_dir)
    summary = dict(config=config, **result, history=history, train_seconds=train_seconds,
                   wall_seconds=time.time() - wall0, sample=text, machine=machine(), torch=torch.__version__)
    if saved_as:
        summary["model_saved_with"] = saved_as
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if can_plot:
        name = f"byte LM{f' ({args.arch})' if hf else ''} on {described}, {_kind(args)}: {result['bits_per_byte']:.3f} bits/byte"
        if args.plain:
            save_figure(out_dir / "summary.png", result, name, "bits_per_byte_by_class", "held-out bits per byte")
        else:
            save_figure(out_dir / "summary.png", result, f"{name}, mean steps {result['mean_steps']:.2f}")
    print(f"held-out {result['bits_per_byte']:.3f} bits per byte, mean steps {result['mean_steps']:.2f}; "
          f"wrote {out_dir}/summary.json" + (f" and the model ({saved_as})" if saved_as else ""))
    print("sample:\n" + text)
    return summary


__all__ = ["main", "parse_args", "read_corpus", "byte_classes", "BYTE_CLASSES"]
