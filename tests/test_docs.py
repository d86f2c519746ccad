"""The documentation sources: every public name is in the API reference, every code block runs.

Reads docs/**/*.md only; building the site (``make docs``, part of ``make test``) is what executes
the guides and renders the docstrings.
"""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import jaxstab

DOCS = Path(__file__).resolve().parent.parent / "docs"
SKIP_DIRS = {"_build", "jupyter_execute", ".ipynb_checkpoints"}

# Modules whose public names are documented one by one, besides jaxstab itself.
SUBMODULES = ("jaxstab.linen", "jaxstab.nnx", "jaxstab.attention_flax", "jaxstab.batchnorm")

# ``.. autofunction:: jaxstab.x`` / ``.. py:class:: jaxstab.x(...)`` inside {eval-rst} blocks, and
# the MyST forms ```{autofunction} jaxstab.x``` / ``:::{py:function} jaxstab.x``.
_TARGET = re.compile(
    r"(?:^\s*\.\.\s+|^\s*(?:`{3,}|:{3,})\{)"
    r"(?:auto(?:module|function|class|exception|data|attribute|method)|"
    r"py:(?:module|function|class|exception|data|attribute|method))"
    r"(?:::\s*|\}\s*)([\w.]+)",
    re.MULTILINE,
)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})(.*)$")  # colon fences: myst colon_fence
_CODE_DIRECTIVES = {"code", "code-block", "sourcecode", "literalinclude", "ipython"}
_RST_CODE = re.compile(r"^\s*\.\.\s+(code|code-block|sourcecode|literalinclude|ipython)::", re.M)
_RST_LITERAL = re.compile(r"::\s*$")


def _doc_files():
    return sorted(
        p for p in DOCS.rglob("*.md") if not SKIP_DIRS.intersection(p.relative_to(DOCS).parts)
    )


def _public_names(module_name: str) -> list[str]:
    """``__all__``, or else the names the module itself defines without a leading underscore."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    tree = ast.parse(inspect.getsource(module))
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_")]


def _public_api() -> list[str]:
    names = [f"jaxstab.{name}" for name in jaxstab.__all__]
    for module_name in SUBMODULES:
        names += [f"{module_name}.{name}" for name in _public_names(module_name)]
    return sorted(set(names))


def _documented() -> set[str]:
    api = DOCS / "api"
    return {m for path in sorted(api.glob("*.md")) for m in _TARGET.findall(path.read_text())}


def test_public_api_is_documented():
    documented = _documented()
    missing = [name for name in _public_api() if name not in documented]
    assert not missing, f"public names missing from docs/api/*.md: {missing}"


def test_api_targets_parse():
    # The parser above finds the reference's directives (guards the test against a silent miss).
    documented = _documented()
    assert {"jaxstab.clip_by_global_norm", "jaxstab.linen.BatchNorm", "jaxstab.nnx"} <= documented
    assert "jaxstab.attention_flax.dot_product_attention" in documented


def _fences(text: str):
    """(line number, fence, info string, body) of each fenced block, outermost first."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group(1), match.group(2).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        yield start, fence, info, "\n".join(body)
        if info.startswith("{") and not info.startswith(("{code-cell}", "{eval-rst}")):
            # an admonition, a tab, a dropdown...: its body may hold fences of its own
            for line, *inner in _fences("\n".join(body)):
                yield start + line, *inner
        i += 1


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_code_block_is_an_executed_cell(path):
    text = path.read_text()
    is_notebook = re.search(r"^kernelspec:", text, re.MULTILINE) is not None
    problems = []
    for line, fence, info, body in _fences(text):
        directive = re.match(r"^\{([\w:-]+)\}", info)
        name = directive.group(1) if directive else None
        if name == "code-cell":
            if not is_notebook:
                problems.append(f"line {line}: code-cell in a page without a kernelspec")
            continue
        if (name is None and not fence.startswith(":")) or name in _CODE_DIRECTIVES:
            problems.append(f"line {line}: {fence}{info} is shown, not run (make it a code-cell)")
        elif name == "eval-rst":
            if _RST_CODE.search(body):
                problems.append(f"line {line}: code block inside eval-rst")
            elif any(_RST_LITERAL.search(ln) for ln in body.splitlines()):
                problems.append(f"line {line}: literal block (::) inside eval-rst")
    assert not problems, f"{path.relative_to(DOCS)}: " + "; ".join(problems)


def test_doc_files_are_found():
    names = {p.relative_to(DOCS).as_posix() for p in _doc_files()}
    assert {"index.md", "guides/quickstart.md", "api/index.md"} <= names
