"""The ACT layers (design §9, §13-§16): torch.nn.RNN / GRU / LSTM
conventions with every time step pondering (rnn.py); a per-token ACT
transformer encoder over a layer or a block of layers and the plain causal
stack beside it (transformer.py, its pool path token_ponder.py), with a
ragged key/value cache for causal incremental evaluation (cache.py); exit
rules at inference (exits.py); one row adapter per layer kind (kinds/)."""
from .cache import ACTCache
from .rnn import ACTCell, ACTGRU, ACTLSTM, ACTRNN
from .transformer import ACTTransformerEncoder, CausalStack

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder", "CausalStack", "ACTCache"]
