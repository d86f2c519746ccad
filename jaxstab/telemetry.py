"""Telemetry: what each jaxstab transform did this step, read out of any optimizer state.

Every jaxstab state is a ``NamedTuple`` registered here with :func:`telemetry_state`, naming the
fields that describe the step (``grad_norm``, ``scale``, ``clipped``, ...). :func:`telemetry`
walks an arbitrary optimizer state (``optax.chain`` tuples, ``optax.masked``,
``optax.inject_hyperparams``, ``optax.MultiSteps``, jaxstab wrappers) and returns those fields as a
flat dict ready for a logger.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxstab import _norms

_REGISTRY: dict[type, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}


def telemetry_state(
    name: str, fields: tuple[str, ...], *, opaque: tuple[str, ...] = ()
) -> Callable[[type], type]:
    """Class decorator: registers a state ``NamedTuple`` and the fields :func:`telemetry` reports.

    Args:
      name: the path component naming the transform, e.g. ``"clip_by_global_norm"``.
      fields: the state fields holding this step's telemetry (float32/bool scalars).
      opaque: fields never searched for nested telemetry (e.g. stored copies of a state).
    """

    def register(cls: type) -> type:
        unknown = (set(fields) | set(opaque)) - set(cls._fields)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        _REGISTRY[cls] = (name, tuple(fields), tuple(opaque))
        return cls

    return register


def _array(value):
    """The array inside a flax ``nnx.Variable`` (an ``nnx.Optimizer`` keeps its state in them),
    else ``value`` itself; flax is not imported for this."""
    if not type(value).__module__.startswith("flax."):
        return value
    get_value = getattr(value, "get_value", None)  # flax >= 0.12; .value before
    return get_value() if get_value is not None else value.value


def _walk(node, prefix: tuple[str, ...], out: dict) -> None:
    is_registered = lambda x: type(x) in _REGISTRY
    pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=is_registered)
    for path, leaf in pairs:
        if not is_registered(leaf):
            continue
        name, fields, opaque = _REGISTRY[type(leaf)]
        here = (*prefix, *filter(None, [_norms.path_str(path)]), name)
        for field in fields:
            out["/".join((*here, field))] = _array(getattr(leaf, field))
        for field in leaf._fields:
            if field not in fields and field not in opaque:
                _walk(getattr(leaf, field), (*here, field), out)


def telemetry(opt_state) -> dict[str, jax.Array]:
    """Flat ``{path: value}`` of every jaxstab telemetry field found in ``opt_state``.

    Keys join the path to the state (chain index, wrapper field names) with ``/``, then the
    transform's name and the field, e.g. ``"0/clip_by_global_norm/grad_norm"``. Values are the
    state's own arrays (no host transfer), so the dict can be returned from a jitted step.

    Args:
      opt_state: any optax optimizer state, or the ``opt_state`` of an ``nnx.Optimizer`` (its
        variables are unwrapped: the values are arrays either way).

    Returns:
      A ``dict[str, jax.Array]``; empty when the state holds no jaxstab transform.

    Example:
      >>> import jax.numpy as jnp, optax, jaxstab
      >>> tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.ones(4)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.full(4, 2.0)}, state, params)
      >>> {k: float(v) for k, v in jaxstab.telemetry(state).items()}
      {'0/clip_by_global_norm/grad_norm': 4.0, '0/clip_by_global_norm/scale': 0.25,
       '0/clip_by_global_norm/clipped': 1.0}
    """
    out: dict[str, jax.Array] = {}
    _walk(opt_state, (), out)
    return out
