"""Counting host work: the ATen ops a piece of code issues, with kernel
launches as one event each (design §11)."""
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch nothing on a device: views and metadata
VIEWS = {"detach", "view", "t", "squeeze", "unsqueeze", "select", "alias", "slice", "expand", "_unsafe_view"}
SYNCS = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "equal"}


class Census(TorchDispatchMode):
    """Records the ATen ops issued, and a LAUNCH event per kernel launcher
    call (what the launcher itself issues is muted: under the Triton
    interpreter a launch runs as many ATen ops, on a GPU as one kernel)."""

    def __init__(self):
        super().__init__()
        self.events, self.muted = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            name = func.overloadpacket.__name__
            if name not in VIEWS:
                self.events.append(name)
        return func(*args, **(kwargs or {}))

    def wrap(self, name, fn):
        def launcher(*args, **kwargs):
            self.events.append(f"LAUNCH {name}")
            self.muted += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.muted -= 1
        return launcher


def census_of(fn, launchers, monkeypatch):
    """The events of fn's second call (the first warms it: parameters hold
    their .grad, as in training), each of `launchers` ((module, name) pairs)
    counted as one LAUNCH event."""
    fn()
    census = Census()
    for module, name in launchers:
        monkeypatch.setattr(module, name, census.wrap(name, getattr(module, name)))
    with census:
        fn()
    monkeypatch.undo()
    return census.events
