"""prune2edge: one trained CNN in, a small int8 voting ensemble for edge devices out (Prune2Edge, arXiv 2004.04710).

    import prune2edge
    cfg = prune2edge.load_config("configs/cifar10-cpu.yaml")
    metrics = prune2edge.run(cfg, "runs/cifar10")
    prune2edge.Bundle.load("runs/cifar10/bundle").predict(images)

Attributes load on first use, so ``import prune2edge.runtime.bundle`` on an edge device pulls in neither torch nor
scikit-learn.
"""

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["Bundle", "UserError", "__version__", "load_config", "run"]


def __getattr__(name: str):
    if name == "run":
        from .pipeline import run

        return run
    if name == "load_config":
        from .config import load

        return load
    if name == "Bundle":
        from .runtime.bundle import Bundle

        return Bundle
    raise AttributeError(f"module 'prune2edge' has no attribute '{name}'")
