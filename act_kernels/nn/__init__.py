"""Drop-in ACT layers: torch.nn.RNN / GRU / LSTM conventions, each time step ponders."""
from .act import ACTCell, ACTGRU, ACTLSTM, ACTRNN

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM"]
