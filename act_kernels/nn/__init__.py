"""Drop-in ACT layers: torch.nn.RNN / GRU / LSTM conventions, each time step
ponders (rnn.py); a per-token ACT transformer encoder (transformer.py)."""
from .rnn import ACTCell, ACTGRU, ACTLSTM, ACTRNN
from .transformer import ACTTransformerEncoder

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder"]
