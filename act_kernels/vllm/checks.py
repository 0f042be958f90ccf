"""What the vLLM plugin refuses, on the model's config alone (no vllm
import here): each refusal names the setting. Run when vLLM builds the
engine's config (config.py) and again when the worker builds the model."""
from __future__ import annotations

from ..layers.checks import check_layer_options

ARCHITECTURE = "LoopedCausalLM"   # what LoopedCausalLM.save_pretrained writes in config.json
EXIT_KEY = "act_exit"             # the config attribute (or hf_overrides key) naming the exit rule
EXITS = ("act", "fixed")          # the exit rules the plugin serves; "act" is LoopedCausalLM's default
# the rules of act_kernels.layers.exits that the plugin does not serve yet
NOT_SERVED = ("gate", "latent", "kl")
FAMILIES = ("llama", "qwen2", "qwen3")   # text_config.model_type: vLLM's decoder layer of that family


def exit_rule(config) -> str:
    """The exit rule the engine runs: config.act_exit, "act" when unset."""
    rule = getattr(config, EXIT_KEY, None)
    if rule is None:
        return "act"
    if rule in NOT_SERVED:
        raise ValueError(f"{EXIT_KEY}={rule!r}: this exit rule of act_kernels is not served by the vLLM plugin yet "
                         f"(served: {', '.join(map(repr, EXITS))})")
    if rule not in EXITS:
        raise ValueError(f"unknown {EXIT_KEY}={rule!r} (hf_overrides or config.json): the vLLM plugin serves "
                         f"{', '.join(map(repr, EXITS))}")
    return rule


def check_config(config) -> tuple[int, int]:
    """A LoopedConfig the plugin can serve: returns the block (start, stop).
    Refuses an exit rule it does not serve, an inner model of another family,
    and the attention settings LoopedCausalLM refuses (act_kernels/hf/checks.py)."""
    exit_rule(config)
    text = getattr(config, "text_config", None)
    if text is None:
        raise ValueError("config.text_config is missing: a LoopedConfig names its inner model's config")
    family = getattr(text, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"text_config.model_type = {family!r}: the vLLM plugin builds the decoder layers of "
                         f"{', '.join(FAMILIES)}")
    check_layer_options(config.max_steps, config.eps, config.backend)   # LoopedCausalLM's own checks
    block = config.block
    layers = text.num_hidden_layers
    if not isinstance(block, (tuple, list)) or len(block) != 2 or \
            any(isinstance(b, bool) or not isinstance(b, int) for b in block):
        raise ValueError(f"block must be a pair of ints (start, stop), got {block!r}")
    start, stop = block
    if not 0 <= start < stop <= layers:
        raise ValueError(f"block = {tuple(block)} must satisfy 0 <= start < stop <= {layers} (text_config."
                         "num_hidden_layers)")
    if getattr(text, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported")
    if getattr(text, "is_causal", True) is False:
        raise ValueError("text_config.is_causal = False: only causal decoders loop")
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True):
        raise ValueError(f"sliding-window attention (text_config.sliding_window = {window}) is not supported")
    types = set(getattr(text, "layer_types", None) or ())
    if types - {"full_attention"}:
        raise ValueError(f"text_config.layer_types {sorted(types)}: only full causal attention is supported")
    for name in ("attention_chunk_size", "dual_chunk_attention_config", "attn_logit_softcapping",
                 "final_logit_softcapping"):
        if getattr(text, name, None) is not None:
            raise ValueError(f"text_config.{name} is set: not supported")
    head_dim = getattr(text, "head_dim", None)
    if family == "qwen2" and head_dim is not None and head_dim != text.hidden_size // text.num_attention_heads:
        raise ValueError(f"text_config.head_dim = {head_dim} with hidden_size / num_attention_heads = "
                         f"{text.hidden_size // text.num_attention_heads}: vLLM's qwen2 layers take the latter")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise ValueError(f"text_config.hidden_act = {text.hidden_act!r}: vLLM's {family} layers take silu")
    return int(start), int(stop)


# hf_overrides keys vLLM itself reads off the model's config (ModelConfig.head_dtype): never the model's own
VLLM_OVERRIDE_KEYS = ("head_dtype",)

OURO_ARCHITECTURE = "OuroForCausalLM"           # Ouro's published config.json (model_type "ouro")
OURO_THRESHOLD_KEY = "early_exit_threshold"     # the config attribute (or hf_overrides key): the exit gate's threshold
# the config attribute (or hf_overrides key) selecting the release's every-loop mode (OuroConfig's every_loop: ours)
OURO_EVERY_LOOP_KEY = "every_loop"


def check_ouro_config(config, overrides=()) -> tuple[float, bool]:
    """An Ouro config the plugin can serve: returns the exit gate's threshold
    and whether the engine runs the release's every-loop mode (config.
    every_loop, False when unset). OuroConfig refuses what its arguments may
    not hold (`act_kernels.hf.ouro.check_ouro_settings`), but vLLM applies
    hf_overrides to the built config, past those checks: the same function
    runs here on the config as the overrides left it. overrides: the
    hf_overrides keys, read too (an unknown one is refused as OuroConfig
    refuses an unknown key)."""
    # imported here: importing act_kernels.vllm imports no transformers
    from ..hf.ouro import CHECKED_KEYS, check_ouro_settings

    overrides = [key for key in overrides if key not in VLLM_OVERRIDE_KEYS]
    settings = {key: getattr(config, key) for key in (*CHECKED_KEYS, *overrides) if hasattr(config, key)}
    try:
        check_ouro_settings(settings)
    except ValueError as error:
        raise ValueError(f"{error} (hf_overrides or config.json)") from None
    return float(settings.get(OURO_THRESHOLD_KEY, 1.0)), settings.get(OURO_EVERY_LOOP_KEY, False)


__all__ = ["ARCHITECTURE", "EXIT_KEY", "EXITS", "NOT_SERVED", "FAMILIES", "exit_rule", "check_config",
           "VLLM_OVERRIDE_KEYS", "OURO_ARCHITECTURE", "OURO_THRESHOLD_KEY", "OURO_EVERY_LOOP_KEY", "check_ouro_config"]
