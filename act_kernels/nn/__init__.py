"""Drop-in ACT layers: torch.nn.RNN / GRU / LSTM conventions, each time step
ponders (rnn.py); a per-token ACT transformer encoder over a layer or a
block of layers, with a ragged key/value cache for causal incremental
evaluation (transformer.py, cache.py); a looped ACT language model with
batched generation (language_model.py)."""
from .cache import ACTCache
from .language_model import ACTLanguageModel, Generation
from .rnn import ACTCell, ACTGRU, ACTLSTM, ACTRNN
from .transformer import ACTTransformerEncoder, CausalStack

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder", "ACTLanguageModel", "Generation",
           "ACTCache", "CausalStack"]
