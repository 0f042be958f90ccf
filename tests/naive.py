"""A deliberately naive padded-and-masked ACT, written independently of the
package: every row is stepped until the slowest one halts, halted rows are
masked out. It only serves to check the ragged reference."""
import torch


def naive_ponder(step_fn, state, weight, bias, max_steps, eps):
    tensors = state if isinstance(state, tuple) else (state,)
    batch = tensors[0].shape[0]
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    everyone = torch.arange(batch, device=tensors[0].device)
    w = weight.reshape(-1).to(acc)
    c = bias.reshape(()).to(acc)
    cum = torch.zeros(batch, dtype=acc, device=w.device)
    halted = torch.zeros(batch, dtype=torch.bool, device=w.device)
    n_steps = torch.zeros(batch, dtype=torch.int64, device=w.device)
    rem = torch.zeros(batch, dtype=acc, device=w.device)
    mean = [torch.zeros(t.shape, dtype=acc, device=w.device) for t in tensors]
    current = tensors
    for n in range(1, max_steps + 1):
        out = step_fn(current if isinstance(state, tuple) else current[0], n, everyone)
        current = out if isinstance(out, tuple) else (out,)
        h = torch.sigmoid(current[0].to(acc) @ w + c)
        running = ~halted
        if n == max_steps:
            stop = running
        else:
            stop = running & (cum + h >= torch.tensor(1.0 - eps, dtype=acc))
        p = torch.where(stop, 1 - cum, torch.where(running & ~stop, h, torch.zeros_like(h)))
        mean = [m + p[:, None] * t.to(acc) for m, t in zip(mean, current)]
        n_steps = torch.where(stop, torch.full_like(n_steps, n), n_steps)
        rem = torch.where(stop, 1 - cum, rem)
        cum = torch.where(running & ~stop, cum + h, cum)
        halted = halted | stop
        if bool(halted.all()):
            break
    rho = n_steps.to(acc) + rem
    S = tuple(m.to(tensors[0].dtype) for m in mean)
    return (S if isinstance(state, tuple) else S[0]), rho, n_steps, rem
