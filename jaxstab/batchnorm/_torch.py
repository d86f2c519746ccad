"""PyTorch's batch-norm conventions, translated."""

from __future__ import annotations

from jaxstab import _checks


def momentum_from_torch(torch_momentum: float) -> float:
    """Flax/jaxstab ``momentum`` for a PyTorch ``BatchNorm`` ``momentum``.

    PyTorch's ``momentum`` is the weight of the *new* batch in the running average
    (``running = (1 - m) * running + m * batch``, default 0.1); flax's is the weight of the *old*
    running value (``running = m * running + (1 - m) * batch``, default 0.99). So
    ``momentum = 1 - torch_momentum``. PyTorch also keeps the running variance unbiased
    (``n / (n - 1)``): pass ``unbiased_running_var=True`` to :class:`jaxstab.linen.BatchNorm` or
    :class:`jaxstab.nnx.BatchNorm` for that.

    Args:
      torch_momentum: in ``[0, 1]``. (PyTorch's ``momentum=None``, a cumulative average, has no
        fixed-momentum equivalent.)

    Returns:
      ``1 - torch_momentum``.

    Example:
      >>> from jaxstab.batchnorm import momentum_from_torch
      >>> momentum_from_torch(0.1)
      0.9
    """
    _checks.check_range("torch_momentum", torch_momentum, low=0.0, high=1.0)
    return 1.0 - torch_momentum
