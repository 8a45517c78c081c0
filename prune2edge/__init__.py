"""prune2edge: one trained CNN in, a small int8 voting ensemble for edge devices out (Prune2Edge, arXiv 2004.04710)."""
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
