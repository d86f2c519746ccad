"""Argument checks shared by the factories: errors that name the parameter and what is allowed."""

from __future__ import annotations

import contextlib

import jax
import numpy as np


def _concrete(value):
    """``value`` as a NumPy array (of dtype object if it is no array at all), or None when it is
    traced or a schedule (checked where it is concrete)."""
    if isinstance(value, jax.core.Tracer) or callable(value):
        return None
    try:
        return np.asarray(value)
    except (TypeError, ValueError):  # e.g. a ragged list
        return np.asarray(None)


def check_range(name: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """Raises ``ValueError`` unless ``value`` is one number in the interval; traced values and
    callables (schedules) pass.

    ``low_open``/``high_open`` exclude the bound. ``None`` for a bound means unbounded. A value
    that is not a real number (``None``, a string, a complex number) raises ``TypeError`` naming
    the parameter, so an optional hyperparameter is checked only when given; an array of more
    than one number raises ``ValueError`` here rather than a broadcasting error inside ``update``.
    """
    v = _concrete(value)
    if v is None:
        return
    if v.dtype.kind in "biuf" and v.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}: {value!r}")
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{lo}, {hi}{right}"
    if v.dtype.kind not in "biuf":  # bool, signed and unsigned integers, floats
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    ok = np.all(np.isfinite(v)) or (high is None and np.all(v == np.inf))
    if low is not None:
        ok &= bool(np.all(v > low)) if low_open else bool(np.all(v >= low))
    if high is not None:
        ok &= bool(np.all(v < high)) if high_open else bool(np.all(v <= high))
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_finite(name: str, value) -> None:
    """Raises ``ValueError`` naming ``name`` if a concrete ``value`` holds an Inf or NaN (for an
    interval without an upper bound, :func:`check_range` lets ``inf`` through)."""
    v = _concrete(value)
    if v is not None and v.dtype.kind in "biuf" and not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_positive_scalar(name: str, value) -> None:
    """Raises ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is one positive,
    finite real number (traced values pass): for a bound such as a soft-cap."""
    check_range(name, value, low=0, low_open=True)
    check_finite(name, value)


def check_int(name: str, value, *, low=None) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python or NumPy integer (not a bool), and
    ``ValueError`` if it is below ``low``: for counts that set shapes or step numbers."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_transformation(name: str, value) -> None:
    """Raises ``TypeError`` unless ``value`` is an optax transformation (has ``init`` and
    ``update``); a factory such as ``optax.adamw`` itself is named as such."""
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    hint = ""
    if callable(value):
        what = getattr(value, "__qualname__", repr(value))
        hint = f"; {what} looks like a factory: call it, e.g. {what}(1e-3)"
    raise TypeError(
        f"{name} must be an optax GradientTransformation (with init and update), got "
        f"{value!r}{hint}"
    )


def check_same_structure(name_a: str, a, name_b: str, b) -> None:
    """Raises ``ValueError`` showing both structures when two trees differ."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    if sa != sb:
        raise ValueError(
            f"{name_a} and {name_b} must have the same tree structure, got\n"
            f"  {name_a}: {sa}\n  {name_b}: {sb}"
        )


@contextlib.contextmanager
def mapped_axis(axis_name):
    """Runs collectives over ``axis_name``; when no ``jax.pmap``/``jax.shard_map`` binds that
    name, the ``NameError`` says what to do instead."""
    try:
        yield
    except NameError as error:
        raise NameError(
            f"axis_name={axis_name!r} is not bound here ({error}). It names the mapped axis of "
            f"a jax.pmap(..., axis_name={axis_name!r}) or a jax.shard_map over a mesh axis of "
            "that name, and works only inside one. Under plain jax.jit leave axis_name=None: "
            "on arrays sharded over a mesh, norms and statistics are already global."
        ) from error
