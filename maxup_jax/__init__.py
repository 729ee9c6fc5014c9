"""MaxUp in JAX: minimise the worst loss over m random augmented copies of each example."""

from maxup_jax.maxup import MaxUpAux, maxup_loss

__all__ = ["MaxUpAux", "maxup_loss"]
__version__ = "0.1.0"
