"""The training application: the paper's synthetic tasks (`tasks`), the task
networks (`model`) and the command `python -m act_kernels.train` (`command`;
its `lm` subcommand in `lm`, the transformers models in `transformers_lm`,
what they share in `common`). It uses the kernel library like any user; the
library never imports it. `main` and `parse_args` are the command's, imported
on first use, so importing one module of the package imports no other."""


def __getattr__(name):
    if name in ("main", "parse_args"):
        from . import command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main", "parse_args"]
