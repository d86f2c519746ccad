"""Sphinx configuration of the jaxstab documentation.

Build: ``make docs`` (``sphinx-build -E -W --keep-going -b html docs docs/_build/html``). Every
guide is a MyST notebook that myst-nb executes on each build; nothing is downloaded at build time.
"""

import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The executed notebooks' kernels inherit this environment: JAX on the CPU, no accelerator probing;
# XLA's compiled programs cached on disk between builds (a changed program is compiled anew, so
# the cache cannot hide a change of jaxstab; `make clean` or removing docs/_build empties it).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "docs" / "_build" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, str(ROOT))

import jaxstab  # noqa: E402

project = "jaxstab"
author = "the jaxstab authors"
copyright = "the jaxstab authors"
release = jaxstab.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- MyST and myst-nb ---------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# Every guide runs on every build, so a guide that no longer works fails the build (and
# `make test`). "force" rather than "cache": a cached notebook would not notice a library change.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 120  # seconds per cell
nb_execution_excludepatterns: list[str] = []
nb_merge_streams = True

# -- autodoc and napoleon (the docstrings are Google style) -------------------------------------
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not as duplicate attribute entries
napoleon_use_rtype = False
napoleon_use_admonition_for_examples = False
python_use_unqualified_type_names = True
add_module_names = True

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"jaxstab {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
html_last_updated_fmt = None


# -- NamedTuple fields: their trailing source comment as their documentation ---------------------
# jaxstab's state classes document each field with a comment on its line
# (``grad_norm: jax.Array  # float32 global norm ...``); autodoc would say "Alias for field
# number 0". This puts the comment there instead.
_ALIAS = re.compile(r"^Alias for field number \d+$")


def _field_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    fields = getattr(cls, "_fields", ())
    out = {}
    for line in source.splitlines():
        match = re.match(r"^\s+(\w+)\s*:\s*[^#]*?#\s*(.+)$", line)
        if match and match.group(1) in fields:
            out[match.group(1)] = match.group(2).strip()
    return out


def _namedtuple_field_doc(app, what, name, obj, options, lines):
    if not (len(lines) == 1 and _ALIAS.match(lines[0])) and not (
        len(lines) == 2 and _ALIAS.match(lines[0]) and not lines[1]
    ):
        return
    owner_name, _, field = name.rpartition(".")
    module_name, _, cls_name = owner_name.rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, cls_name, None)
    comment = _field_comments(cls).get(field) if cls is not None else None
    lines[:] = [comment] if comment else []


# -- A module-level string documented with autodata: not ``str``'s own docstring -----------------
def _no_builtin_docstring(app, what, name, obj, options, lines):
    if what == "data" and type(obj).__module__ == "builtins":
        lines[:] = []


# -- nnx classes: the signature of ``__init__``, not of flax's metaclass ``__call__`` -----------
def _skip_metaclass_call_signatures() -> None:
    import importlib

    from jaxstab import nnx as jaxstab_nnx

    calls = {
        f"{c.__module__}.{c.__qualname__}"
        for c in (type(jaxstab_nnx.BatchNorm).__call__, type(jaxstab_nnx.BatchNormReport).__call__)
    }
    for where in (
        "sphinx.ext.autodoc._dynamic._signatures",  # Sphinx >= 8.3
        "sphinx.ext.autodoc._legacy_class_based._documenters",
        "sphinx.ext.autodoc",  # Sphinx < 8.3
    ):
        try:
            module = importlib.import_module(where)
        except ImportError:
            continue
        old = getattr(module, "_METACLASS_CALL_BLACKLIST", None)
        if old is not None:
            new = set(old) | calls
            new = list(new) if isinstance(old, list) else frozenset(new)
            module._METACLASS_CALL_BLACKLIST = new


# -- Cross-references to where a public object is defined (``jaxstab.logits.softcap``) resolve to
# where the reference documents it (``jaxstab.softcap``). ---------------------------------------
def _import(dotted: str):
    import importlib

    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def _resolve_reexport(app, env, node, contnode):
    from sphinx.util.nodes import make_refnode

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("jaxstab."):
        return None
    documented = f"jaxstab.{target.rpartition('.')[2]}"
    entry = env.get_domain("py").objects.get(documented)
    obj = _import(target)
    if entry is None or obj is None or obj is not _import(documented):
        return None
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    _skip_metaclass_call_signatures()
    app.connect("autodoc-process-docstring", _no_builtin_docstring)
    app.connect("autodoc-process-docstring", _namedtuple_field_doc)
