"""Update-side optimizers: Adam variants that keep the *update* in check, not the gradient.

Gradient clipping acts before the optimizer, but many loss spikes are born inside it: Adam's
second moment lags behind a sudden rise in squared gradients, and ``m / sqrt(v)`` blows up while
the gradient norm looks ordinary. Each optimizer here is a drop-in for ``optax.adamw`` (its
arguments, in its positions) with a chainable core (``scale_by_*``), one per file:

- :mod:`~jaxstab.optimizers.stable_adam`: StableAdamW, per-tensor update clipping;
- :mod:`~jaxstab.optimizers.spam`: SPAM, spike-aware clipping and momentum resets;
- :mod:`~jaxstab.optimizers.adam_atan2`: Adam-atan2, no epsilon;

built on the shared machinery of :mod:`jaxstab.optimizers._adam` (float32 moments, optax's bias
correction and weight decay, per-tensor gating of non-finite values).
"""

from jaxstab.optimizers.adam_atan2 import ScaleByAdamAtan2State, adam_atan2, scale_by_adam_atan2
from jaxstab.optimizers.spam import ScaleBySpamState, scale_by_spam, spam
from jaxstab.optimizers.stable_adam import (
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
