"""The task generators' labels, recomputed from their inputs, and a smoke run
of the training command."""
import json

import pytest
import torch

from act_kernels.train.tasks import make_task
from act_kernels.train.tasks.logic import GATES


def sample(name, batch=64, seed=0, **knobs):
    return make_task(name, "small", **knobs).sample(batch, torch.Generator().manual_seed(seed))


def test_parity_labels():
    b = sample("parity", size=12, batch=256)
    x = b.inputs[0]
    assert set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    for row in range(x.shape[0]):
        values = x[row].tolist()
        nonzero = sum(v != 0 for v in values)
        assert b.difficulty[0, row] == nonzero and 1 <= nonzero <= 12
        assert b.targets[0, row, 0] == sum(v == 1 for v in values) % 2
    assert b.mask.all() and (b.lengths == 1).all()
    assert b.difficulty.min() == 1 and b.difficulty.max() == 12  # the whole range occurs


def test_logic_gates_are_the_ten_two_input_functions():
    named = {
        "and": lambda a, b: a & b, "or": lambda a, b: a | b, "nand": lambda a, b: 1 - (a & b),
        "nor": lambda a, b: 1 - (a | b), "xor": lambda a, b: a ^ b, "xnor": lambda a, b: 1 - (a ^ b),
        "a and not b": lambda a, b: a & (1 - b), "not a and b": lambda a, b: (1 - a) & b,
        "a or not b": lambda a, b: a | (1 - b), "not a or b": lambda a, b: (1 - a) | b,
    }
    tables = {tuple(f(a, b) for a in (0, 1) for b in (0, 1)) for f in named.values()}
    assert {tuple(r) for r in GATES.tolist()} == tables


def test_logic_labels():
    task = make_task("logic", "small")
    b = task.sample(64, torch.Generator().manual_seed(1))
    G = task.max_gates
    for row in range(b.inputs.shape[1]):
        prev = None
        for t in range(int(b.lengths[row])):
            v = b.inputs[t, row]
            b_prev = int(v[0]) if t == 0 else prev
            b_cur = int(v[1])
            chunks = v[2:].reshape(G, 10)
            n_gates = int(chunks.sum())
            assert n_gates == b.difficulty[t, row] and 1 <= n_gates <= G
            for i in range(n_gates):
                gate = int(chunks[i].argmax())
                b_prev, b_cur = b_cur, int(GATES[gate, 2 * b_cur + b_prev])
            assert b.targets[t, row, 0] == b_cur
            prev = b_cur
        assert not b.mask[int(b.lengths[row]):, row].any()


def test_addition_labels():
    task = make_task("addition", "small", max_len=4, max_digits=3)
    b = task.sample(64, torch.Generator().manual_seed(2))
    for row in range(b.inputs.shape[1]):
        total = 0
        for t in range(int(b.lengths[row])):
            blocks = b.inputs[t, row].reshape(3, 10)
            present = blocks.sum(1) > 0
            assert int(present.sum()) == b.difficulty[t, row]
            number = sum(int(blocks[k].argmax()) * 10 ** k for k in range(3) if present[k])
            total += number
            digits = str(total)[::-1]
            want = [int(digits[k]) if k < len(digits) else 10 for k in range(4)]
            assert b.targets[t, row].tolist() == want


def test_sort_labels():
    task = make_task("sort", "small", max_len=6)
    b = task.sample(64, torch.Generator().manual_seed(3))
    for row in range(b.inputs.shape[1]):
        n = int(b.lengths[row]) // 2
        values = b.inputs[:n, row, 0].tolist()
        assert b.inputs[:n, row, 1].tolist() == [0.0] * (n - 1) + [1.0]
        assert b.mask[:, row].nonzero().squeeze(1).tolist() == list(range(n, 2 * n))
        order = b.targets[n:2 * n, row, 0].tolist()
        assert order == sorted(range(n), key=lambda i: values[i])


def test_pointer_labels():
    """Every token's target recomputed by following its pointers hop by hop."""
    task = make_task("pointer", "small")
    b = task.sample(64, torch.Generator().manual_seed(3))
    V, L, K = task.values, task.max_len, task.max_hops
    assert b.inputs.shape == (L, 64, V + L + K + 1)
    for row in range(64):
        n = int(b.lengths[row])
        assert 2 <= n <= L and b.mask[:, row].tolist() == [True] * n + [False] * (L - n)
        x = b.inputs[:n, row]
        values = x[:, :V].argmax(-1).tolist()
        pointers = x[:, V:V + L].argmax(-1).tolist()
        hops = x[:, V + L:].argmax(-1).tolist()
        assert max(pointers) < n and bool((b.inputs[n:, row] == 0).all())
        for i in range(n):
            j = i
            for _ in range(hops[i]):
                j = pointers[j]
            assert b.targets[i, row, 0] == values[j] and b.difficulty[i, row] == hops[i]
    assert set(b.difficulty[b.mask].tolist()) == set(range(K + 1))


def test_fixed_depth_baseline_for_the_transformer_task(tmp_path):
    from act_kernels.train import main

    summary = main(["pointer", "--iterations", "2", "--eval-every", "2", "--eval-batches", "1",
                    "--batch-size", "4", "--hidden", "16", "--fixed-steps", "3", "--out", str(tmp_path),
                    "--no-progress"])
    assert summary["config"]["max_steps"] == 3
    assert all(v["mean_steps"] == 3 for v in summary["by_difficulty"].values())
    assert summary["spearman_steps_difficulty"] is None   # constant steps: undefined, not 0


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_fixed_depth_baseline_for_recurrent_tasks(cell):
    """fixed_steps=K runs the layer's own cell K times per input (flag 1 on the
    first) and reads out the last state: checked against a hand unroll."""
    from act_kernels.train.model import TaskModel
    from act_kernels.train.tasks import make_task

    torch.manual_seed(0)
    task = make_task("addition", max_len=3, max_digits=2)
    model = TaskModel(task, 8, max_steps=5, fixed_steps=3, cell=cell)
    batch = task.sample(4, torch.Generator().manual_seed(1))
    out = model(batch)
    c = model.rnn.cell
    L, B = batch.inputs.shape[:2]
    h = torch.zeros(B, 8)
    state = (h, h) if cell == "lstm" else h
    for t in range(L):
        for k in range(3):
            flag = torch.full((B, 1), 1.0 if k == 0 else 0.0)
            state = c(torch.cat([batch.inputs[t], flag], 1), state)
        want = model.readout(state[0] if cell == "lstm" else state).reshape(B, task.heads, task.classes)
        torch.testing.assert_close(out.logits[t], want)
    assert torch.equal(out.steps, batch.mask.long() * 3)
    assert not out.ponder_cost.any()
    with pytest.raises(ValueError, match="fixed_steps"):
        TaskModel(task, 8, max_steps=5, fixed_steps=-1)


def test_spearman_matches_a_hand_computation():
    from act_kernels.train.command import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks 1.5 1.5 3 4, y ranks 1 2 3 4 -> rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def test_training_command_smoke(tmp_path):
    from act_kernels.train import main

    summary = main(["parity", "--iterations", "6", "--eval-every", "3", "--eval-batches", "1",
                    "--batch-size", "8", "--hidden", "16", "--out", str(tmp_path), "--no-progress",
                    "--backend", "reference"])
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert (tmp_path / "checkpoint.pt").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["task"] == "parity" and len(saved["history"]) == 2
    assert 0.0 <= summary["final_sequence_error"] <= 1.0
    # resume continues from the checkpoint without repeating iterations
    again = main(["parity", "--iterations", "9", "--eval-every", "3", "--eval-batches", "1",
                  "--batch-size", "8", "--hidden", "16", "--out", str(tmp_path), "--no-progress",
                  "--backend", "reference", "--resume"])
    assert [h["iteration"] for h in again["history"]] == [3, 6, 9]


@pytest.mark.parametrize("name", ["logic", "addition", "sort", "pointer"])
def test_training_runs_on_every_task(tmp_path, name):
    from act_kernels.train import main

    summary = main([name, "--iterations", "2", "--eval-every", "2", "--eval-batches", "1",
                    "--batch-size", "4", "--hidden", "8", "--max-steps", "3", "--out", str(tmp_path),
                    "--no-progress"])
    assert summary["config"]["task"] == name
