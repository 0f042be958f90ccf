"""The torch.nn-style public names, in one place: the ACT layers
(act_kernels.layers) and the looped language model over torch encoder
layers (act_kernels.models)."""
from ..layers import ACTGRU, ACTLSTM, ACTRNN, ACTCache, ACTCell, ACTTransformerEncoder, CausalStack
from ..models import ACTLanguageModel, GenerateOutput, LanguageModelOutput

__all__ = ["ACTCell", "ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder", "ACTLanguageModel",
           "LanguageModelOutput", "GenerateOutput", "ACTCache", "CausalStack"]
