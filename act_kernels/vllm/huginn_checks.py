"""What the vLLM plugin refuses in a Huginn config (no vllm import here),
each refusal naming the setting: run when vLLM builds the engine's config
(config.py), after hf_overrides are applied, and again when the worker
builds the model (huginn.py).

The exit settings are ours, given with vLLM's hf_overrides (Huginn's
published config has none, and HuginnConfig refuses unknown keys in
config.json): `act_exit` ("fixed", the default, or "latent-diff"),
`exit_threshold` (> 0, required by "latent-diff") and `exit_min_steps`
(an int in [0, mean_recurrence), default 0). The criteria that read the
coda at every step are refused by name (huginn.py says why)."""
from __future__ import annotations

import math
from typing import NamedTuple

from .checks import EXIT_KEY, VLLM_OVERRIDE_KEYS

HUGINN_ARCHITECTURES = ("RavenForCausalLM", "HuginnForCausalLM")   # the published name, and the one we save
HUGINN_EXITS = ("fixed", "latent-diff")
HUGINN_NOT_SERVED = ("kl", "entropy-diff", "argmax-stability")
THRESHOLD_KEY, MIN_STEPS_KEY = "exit_threshold", "exit_min_steps"


class HuginnSettings(NamedTuple):
    exit: str          # "fixed" or "latent-diff"
    threshold: float   # the criterion's threshold (0.0 under "fixed")
    min_steps: int     # no exit before step min_steps + 1
    steps: int         # num_steps: config.mean_recurrence
    std: float         # the initial state's std (0.0: zeros)

    @property
    def compiles(self) -> bool:
        """Whether vLLM's torch.compile and CUDA graphs take the model: at the
        fixed depth with zero initial states its shapes are the batch's; an
        exit sizes the products by the running tokens (a host sync per step),
        and the initial states' draws come from the model's own generator."""
        return self.exit == "fixed" and self.std == 0.0


def check_huginn_config(config, overrides=()) -> HuginnSettings:
    """A Huginn config the plugin can serve, and its settings. HuginnConfig
    checks its own arguments, but vLLM applies hf_overrides to the built
    config, past those checks: the keys that shape the forward are checked
    again here. overrides: the hf_overrides keys; one that is neither
    HuginnConfig's, the exit settings' nor vLLM's own is refused (a typo
    would be served silently)."""
    # imported here: importing act_kernels.vllm imports no transformers
    from ..hf.huginn import HuginnConfig

    unknown = sorted(set(overrides) - set(HuginnConfig.known_keys()) - {EXIT_KEY, THRESHOLD_KEY, MIN_STEPS_KEY}
                     - set(VLLM_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown hf_overrides keys {unknown} for Huginn: neither HuginnConfig's nor the exit "
                         f"settings ({EXIT_KEY}, {THRESHOLD_KEY}, {MIN_STEPS_KEY})")
    steps = getattr(config, "mean_recurrence", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"mean_recurrence = {steps!r} (hf_overrides or config.json): the recurrence's steps, "
                         "an int >= 1")
    rule = getattr(config, EXIT_KEY, None) or "fixed"
    if rule in HUGINN_NOT_SERVED:
        raise ValueError(f"{EXIT_KEY}={rule!r}: Huginn's criteria that read the coda at every step are not served "
                         f"by the vLLM plugin (a prefill chunk's tokens would read each other's peeked coda rows); "
                         f"served: {', '.join(map(repr, HUGINN_EXITS))}")
    if rule not in HUGINN_EXITS:
        raise ValueError(f"unknown {EXIT_KEY}={rule!r} (hf_overrides) for Huginn: the vLLM plugin serves "
                         f"{', '.join(map(repr, HUGINN_EXITS))}")
    threshold = getattr(config, THRESHOLD_KEY, None)
    min_steps = getattr(config, MIN_STEPS_KEY, 0)
    if rule == "fixed":
        for key, value, unset in ((THRESHOLD_KEY, threshold, None), (MIN_STEPS_KEY, min_steps, 0)):
            if value != unset:
                raise ValueError(f"{key} = {value!r} applies to an exit criterion: give {EXIT_KEY}='latent-diff'")
        threshold = 0.0
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or not threshold > 0:
            raise ValueError(f"{THRESHOLD_KEY} = {threshold!r} (hf_overrides): {EXIT_KEY}={rule!r} needs a "
                             "threshold > 0")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 0 <= min_steps < steps:
            raise ValueError(f"{MIN_STEPS_KEY} = {min_steps!r} (hf_overrides): an int in [0, mean_recurrence = "
                             f"{steps})")
    state_init = getattr(config, "state_init", "like-init")
    if state_init not in ("like-init", "zero"):
        raise ValueError(f"state_init = {state_init!r} (hf_overrides or config.json): 'like-init' (the published "
                         "rule) or 'zero'")
    init_values = getattr(config, "init_values", None) or {}
    if not isinstance(init_values, dict):
        raise ValueError(f"init_values = {init_values!r}: a dict such as {{'std': 0.02}}")
    std = init_values.get("std", 0.0) or 0.0
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"init_values.std = {std!r}: a finite std >= 0")
    if getattr(config, "test_time_noise", 0):
        raise ValueError("test_time_noise > 0 (noise injected before every step) is not supported")
    if config.n_embd % config.n_heads:
        raise ValueError(f"n_embd = {config.n_embd} must be a multiple of n_heads = {config.n_heads}")
    for key in ("n_layers_in_recurrent_block", "n_layers_in_coda"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} = {getattr(config, key)!r}: at least one layer")
    return HuginnSettings(rule, float(threshold), int(min_steps), steps, 0.0 if state_init == "zero" else float(std))


__all__ = ["HUGINN_ARCHITECTURES", "HUGINN_EXITS", "HUGINN_NOT_SERVED", "THRESHOLD_KEY", "MIN_STEPS_KEY",
           "HuginnSettings", "check_huginn_config"]
