"""jaxstab: keep JAX training from exploding.

Gradient transformations that clip or rescale (optax-chainable), guards that skip bad steps, and
a Flax batch norm (linen and nnx). See the README for the feature table.
"""

from jaxstab._norms import global_norm

__version__ = "0.1.0"

__all__ = [
    "global_norm",
]
