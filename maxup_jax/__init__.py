"""MaxUp in JAX: minimise the worst loss over m random augmented copies of each example.

    from maxup_jax import maxup_loss, augment, losses
    loss, aux = maxup_loss(loss_fn, params, batch, key, num_copies=4)

Modules: `maxup` (the loss), `augment` (perturbations P(.|x) driven by
per-example keys), `losses` (per-example classification losses), `models`
(the paper's networks), `smoothing` (randomized-smoothing certification).
"""

from maxup_jax import augment, losses
from maxup_jax.maxup import MaxUpAux, maxup_loss

__all__ = ["MaxUpAux", "augment", "losses", "maxup_loss"]
__version__ = "0.1.0"
