"""Distributed training with torch.distributed on the CPU (gloo, 2 processes):
after k optimizer steps, DDP and FSDP2 (`fully_shard`) replicas hold the
parameters of one process trained on the whole batch, for every layer."""
import datetime
import functools
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import act_kernels as ak

WORLD, STEPS = 2, 3
KINDS = ["ddp", "fsdp2"]
LAYERS = ["ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder", "LoopedCausalLM", "OuroForCausalLM"]
# transformers' RMSNorm computes in float32 inside a float64 model: sums over other row sets round differently
TOLERANCE = {"LoopedCausalLM": dict(atol=1e-6, rtol=1e-5)}


def build(name):
    torch.manual_seed(0)
    if name == "LoopedCausalLM":
        import transformers

        from act_kernels.hf import LoopedCausalLM

        config = transformers.LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                          initializer_range=0.2)
        return LoopedCausalLM(transformers.LlamaForCausalLM(config).double(), (1, 2), max_steps=4,
                              halting_bias_init=0.0)
    if name == "OuroForCausalLM":   # the gate halts by ACT in training (fine-tuning Ouro's exit)
        from act_kernels.hf import OuroConfig, OuroForCausalLM

        config = OuroConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=4, total_ut_steps=4,
                            initializer_range=0.2, max_position_embeddings=64)
        return OuroForCausalLM(config).double()
    if name == "ACTTransformerEncoder":
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = ak.nn.ACTTransformerEncoder(layer, max_steps=4, halting_bias_init=0.0)
    else:
        model = getattr(ak.nn, name)(4, 8, max_steps=4, halting_bias_init=0.0, batch_first=True)
    return model.double()


def data(name, batch=4):
    g = torch.Generator().manual_seed(1)
    if name in ("LoopedCausalLM", "OuroForCausalLM"):
        return torch.randint(0, 29, (batch, 6), generator=g)
    width = 8 if name == "ACTTransformerEncoder" else 4
    return torch.randn(batch, 5, width, generator=g, dtype=torch.float64)


def loss_of(model, x):
    out = model(x)
    inner = model.module if hasattr(model, "module") else model
    if hasattr(out, "logits"):   # LoopedCausalLM
        return out.logits.square().mean() + 0.01 * out.ponder_cost.sum(1).mean()
    out = out[0] if isinstance(out, tuple) else out
    # a mean over the batch: the average of the two halves' losses is the whole batch's
    return out.square().mean() + 0.01 * inner.ponder_cost.sum(1).mean()


def train(model, x, params):
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()


def _worker(rank, init_file, results, kinds):
    # a bounded wait: a rank that dies makes the other's collectives fail in 2 minutes, not hang the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for kind, name in ((k, n) for k in kinds for n in LAYERS):
            model = build(name)
            x = data(name).chunk(WORLD)[rank]
            if kind == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                train(wrapped, x, wrapped.parameters())
                state = {k: v.detach() for k, v in model.state_dict().items()}
            else:
                from torch.distributed.fsdp import fully_shard

                fully_shard(model)
                train(model, x, model.parameters())
                state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                         for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(state, os.path.join(results, kind, f"{name}.pt"))
            # the wrappers' C++ state (DDP's reducer, FSDP's hooks) goes while the group is alive:
            # destroyed after it, at the worker's exit, it could hang or abort the process
            del model, state
            wrapped = None
            gc.collect()
        # every rank's collectives complete before any rank tears the group down
        dist.barrier()
    finally:
        dist.destroy_process_group()


# the fixture below trains both kinds in one start of the ranks: the tests share an xdist worker
pytestmark = pytest.mark.xdist_group("distributed")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Every kind's replicas, trained one kind after the other in one start of
    the WORLD processes (starting them, torch and transformers imported in
    each, is most of the time): a folder with <kind>/<layer>.pt."""
    results = tmp_path_factory.mktemp("replicas")
    for kind in KINDS:
        (results / kind).mkdir()
    init_file = tempfile.mktemp(dir=results)
    mp.spawn(_worker, args=(init_file, str(results), KINDS), nprocs=WORLD, join=True)
    return results


@functools.lru_cache(maxsize=None)
def trained_alone(name):
    """The parameters of one process trained on the whole batch (the same for every kind)."""
    single = build(name)
    train(single, data(name), single.parameters())
    return {k: v.detach().clone() for k, v in single.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_replicas_match_one_process_on_the_whole_batch(kind, replicas):
    for name in LAYERS:
        got = torch.load(replicas / kind / f"{name}.pt")
        for key, value in trained_alone(name).items():
            tol = TOLERANCE.get(name, dict(atol=1e-10, rtol=1e-8))
            torch.testing.assert_close(got[key], value, **tol, msg=lambda m: f"{kind} {name} {key}: {m}")
