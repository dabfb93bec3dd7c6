"""acl-kernels: fused supervised-contrastive losses for long-tailed training at large batch."""

from .functional import contrastive_loss
from .losses import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss

__all__ = ["contrastive_loss", "SupConLoss", "PaCoLoss", "GPaCoLoss", "ACLLoss"]
__version__ = "0.1.0"
