"""Update-side optimizers: Adam variants that keep the *update* in check, not the gradient.

Gradient clipping acts before the optimizer, but many loss spikes are born inside it: Adam's
second moment lags behind a sudden rise in squared gradients, and ``m / sqrt(v)`` blows up while
the gradient norm looks ordinary. Each optimizer here is a drop-in for ``optax.adamw`` (its
arguments, in its positions) with a chainable core (``scale_by_*``), one per file:

- StableAdamW (``_stable_adam.py``): per-tensor update clipping;
- SPAM (``_spam.py``): spike-aware clipping and momentum resets;
- Adam-atan2 (``_adam_atan2.py``): no epsilon;

built on their shared machinery in ``_adam.py`` (float32 moments, optax's bias correction and
weight decay, per-tensor gating of non-finite values).
"""

from jaxstab.optimizers._adam_atan2 import ScaleByAdamAtan2State, adam_atan2, scale_by_adam_atan2
from jaxstab.optimizers._spam import ScaleBySpamState, scale_by_spam, spam
from jaxstab.optimizers._stable_adam import (
    ScaleByStableAdamState,
    scale_by_stable_adam,
    stable_adamw,
)

__all__ = [
    "ScaleByAdamAtan2State",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "adam_atan2",
    "scale_by_adam_atan2",
    "scale_by_spam",
    "scale_by_stable_adam",
    "spam",
    "stable_adamw",
]
