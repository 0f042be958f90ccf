"""Looped language models (design §14-§16): the one core every front end
uses (core.py) and its torch-layer front end, `ACTLanguageModel`
(language_model.py). The transformers front end is `act_kernels.hf`."""
from .core import LoopedCore, PonderNetTerms
from .language_model import ACTLanguageModel, GenerateOutput, LanguageModelOutput

__all__ = ["LoopedCore", "PonderNetTerms", "ACTLanguageModel", "LanguageModelOutput", "GenerateOutput"]
