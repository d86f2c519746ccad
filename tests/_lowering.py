"""Counting the conditionals a compiled step keeps, from its StableHLO text.

``jax.export.export(jax.jit(f), platforms=["cuda"])`` lowers for a GPU on a machine without one.
``jax.lax.platform_dependent`` leaves a ``case`` on a constant index in that text (the chosen
branch alone); XLA folds it away. What is left -- a ``case``/``if`` whose selector is computed --
runs on a GPU as a copy of the selector to the host and a wait, every step.
"""

from __future__ import annotations

import re

import jax
from jax import export  # jax < 0.7 does not load jax.export on ``import jax``

_DEFINITION = re.compile(r"^\s*(%[\w#:]+(?:, %[\w#:]+)*) = (.*)$")
_CONDITIONAL = re.compile(r'"stablehlo\.(?:case|if)"\((%[\w#]+)\)')
_RETURN = re.compile(r"stablehlo\.return (.*?) :")


def _names(results: str) -> list[str]:
    return [name.split(":")[0] for name in results.split(", ")]


def _returned(lines: list[str], start: int) -> list[str]:
    """The values every region of the conditional opening at ``lines[start]`` returns."""
    depth, values = 0, []
    for i in range(start, len(lines)):
        depth += lines[i].count("{") - lines[i].count("}")
        if i > start and (found := _RETURN.search(lines[i])):
            values += [v.strip() for v in found.group(1).split(",")]
        if i > start and depth <= 0:
            return values
    raise ValueError("unbalanced conditional in the StableHLO text")


def live_conditionals(mlir: str) -> list[str]:
    """The lines of ``mlir`` that open a conditional whose selector is not a constant.

    Constants are ``stablehlo.constant`` results and the results of a conditional on a constant
    whose regions return only constants (how ``platform_dependent`` picks its branch index).
    """
    constant: set[str] = set()
    live = []
    lines = mlir.splitlines()
    for i, line in enumerate(lines):
        definition = _DEFINITION.match(line)
        if definition and "stablehlo.constant" in definition.group(2):
            constant.update(_names(definition.group(1)))
        if not (conditional := _CONDITIONAL.search(line)):
            continue
        if conditional.group(1) not in constant:
            live.append(line.strip())
        elif definition and all(v in constant for v in _returned(lines, i)):
            constant.update(_names(definition.group(1)))
    return live


def conditionals(fn, *args, platform: str) -> list[str]:
    """The live conditionals of ``jax.jit(fn)(*args)`` lowered for ``platform``."""
    exported = export.export(jax.jit(fn), platforms=[platform])(*args)
    return live_conditionals(exported.mlir_module())
