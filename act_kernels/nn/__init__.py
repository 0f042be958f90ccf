"""Drop-in ACT layers: torch.nn.RNN / GRU / LSTM conventions, each time step
ponders (rnn.py); a per-token ACT transformer encoder over a layer or a
block of layers, with a ragged key/value cache for causal incremental
evaluation (transformer.py, cache.py); the looped language-model core
(looped.py) and its torch-layer front end, `ACTLanguageModel`
(language_model.py); the slot scheduler that generates with them
(generation.py, depthwise.py)."""
from .cache import ACTCache
from .language_model import ACTLanguageModel, GenerateOutput, LanguageModelOutput
from .rnn import ACTCell, ACTGRU, ACTLSTM, ACTRNN
from .transformer import ACTTransformerEncoder, CausalStack

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder", "ACTLanguageModel",
           "LanguageModelOutput", "GenerateOutput", "ACTCache", "CausalStack"]
