"""Write ``docs/api.md``, the API reference, from the package's ``__all__`` lists and docstrings.

For every module in :data:`MODULES`: each public name (the module's ``__all__``, or the public names
it defines itself when it has none) with its signature and the first paragraph of its docstring;
for a class, also the public methods and properties it adds (not those it overrides from torch or
Lightning). A name exported by several modules is described once, where it first appears.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"
PACKAGE = "lightning_lowmem"

#: The documented modules, in the order of the reference. Every subpackage with an ``__all__`` must
#: be listed (``tests/test_docs.py`` checks it).
MODULES = (
    "lightning_lowmem",
    "lightning_lowmem.config",
    "lightning_lowmem.optim",
    "lightning_lowmem.optim.registry",
    "lightning_lowmem.optim.names",
    "lightning_lowmem.optim.schedulers",
    "lightning_lowmem.partition",
    "lightning_lowmem.strategies",
    "lightning_lowmem.callbacks",
    "lightning_lowmem.callbacks.core",
    "lightning_lowmem.models",
    "lightning_lowmem.data",
    "lightning_lowmem.estimate",
    "lightning_lowmem.utils",
    "lightning_lowmem.kernels",
)

HEADER = """\
# API reference

Generated from the docstrings by `python docs/gen_api.py`: do not edit by hand.
`tests/test_docs.py` fails when this file is out of date. Each entry gives the signature and the
first paragraph of the docstring; `help(name)` in Python prints the rest (arguments, errors,
examples). Names are listed where they are first exported: `lightning_lowmem.AdamMini` is also
`lightning_lowmem.optim.AdamMini`.
"""


def public_names(module: types.ModuleType) -> list[str]:
    """``module.__all__``, or the public names the module defines itself (in source order)."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    own = []
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if getattr(obj, "__module__", None) == module.__name__ or (
            not callable(obj) and _constant_comment(module, name) is not None
        ):
            own.append(name)
    return own


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line, with Sphinx roles made Markdown."""
    paragraph = inspect.cleandoc(doc or "").split("\n\n")[0].replace("\n", " ").strip()
    return markdown(paragraph) or "(no docstring)"


def own_doc(obj: object) -> str | None:
    """``obj``'s own docstring (for a class, not one inherited from a base class)."""
    return vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__


def markdown(text: str) -> str:
    """Sphinx markup to Markdown: ``x`` -> `x`, :class:`~a.b.C` -> `C`, :math:`x` -> `x`."""
    text = re.sub(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`", lambda m: f"`{_short(m)}`", text)
    text = re.sub(r":math:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _short(match: re.Match) -> str:
    target = match.group(1)
    return target.rsplit(".", 1)[-1] if match.group(0).split("`")[1].startswith("~") else target


def signature(obj: object, name: str) -> str:
    """``name(arg: type = default, ...)``, with defaults shown by name where their repr is not stable."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts, kw_only_marked = [], False
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):  # a method, read from its class
        params = params[1:]
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not kw_only_marked:
            if not any(q.kind is q.VAR_POSITIONAL for q in params[:i]):
                parts.append("*")
            kw_only_marked = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    result = f"{name}({', '.join(parts)})"
    if sig.return_annotation is not sig.empty and not isinstance(obj, type):
        result += f" -> {_annotation(sig.return_annotation)}"
    return result


def _annotation(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _default(value: object) -> str:
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return value.__name__  # a function's repr holds its address
    return repr(value)


def _constant_comment(module: types.ModuleType, name: str) -> str | None:
    """The ``#:`` comment above ``name = ...`` in the package source (where the constant is defined)."""
    package_dir = Path(importlib.import_module(PACKAGE).__file__).parent
    files = [Path(module.__file__)] if module.__file__ else []
    files += sorted(package_dir.rglob("*.py"))
    pattern = re.compile(rf"^{re.escape(name)}\s*(:[^=]+)?=")
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if pattern.match(line):
                comment = []
                j = i - 1
                while j >= 0 and lines[j].startswith("#:"):
                    comment.insert(0, lines[j][2:].strip())
                    j -= 1
                return markdown(" ".join(comment)) if comment else None
    return None


def _own_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties ``cls`` adds, skipping overrides of bases outside the package."""
    outside = [base for base in cls.__mro__[1:] if not base.__module__.startswith(PACKAGE)]
    members: dict[str, object] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PACKAGE):
            break
        for name, obj in vars(klass).items():
            if name.startswith("_") or name in members or any(name in vars(base) for base in outside):
                continue
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
            if isinstance(obj, (types.FunctionType, property)):
                members[name] = obj
    return sorted(members.items())


def describe(module: types.ModuleType, name: str) -> list[str]:
    """The Markdown lines of one public name."""
    obj = getattr(module, name)
    if isinstance(obj, type):
        lines = [f"### `{name}`", "", f"class `{signature(obj, name)}`", "", first_paragraph(own_doc(obj)), ""]
        for member, value in _own_members(obj):
            doc = first_paragraph(inspect.getdoc(getattr(obj, member)))  # inherited from a package base if not its own
            lines.append(f"- `{member}` (property): {doc}" if isinstance(value, property)
                         else f"- `{signature(value, member)}`: {doc}")
        return [*lines, ""]
    if callable(obj):
        return [f"### `{name}`", "", f"`{signature(obj, name)}`", "", first_paragraph(own_doc(obj)), ""]
    value = repr(obj)
    if len(value) <= 100:
        shown = f"`{name} = {value}`"
    else:  # too long to show: its type and size
        shown = f"`{name}`: a `{type(obj).__name__}`" + (f" of {len(obj)} entries" if hasattr(obj, "__len__") else "")
    return [f"### `{name}`", "", shown, "", _constant_comment(module, name) or "", ""]


def render() -> str:
    """The whole of ``docs/api.md``."""
    out = [HEADER]
    seen: dict[int, str] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", "", first_paragraph(module.__doc__), ""]
        for name in public_names(module):
            obj = getattr(module, name)
            key = id(obj)
            if (isinstance(obj, type) or callable(obj)) and key in seen:
                out += [f"- `{name}`: see `{seen[key]}.{name}` above.", ""]
                continue
            seen[key] = module_name
            out += describe(module, name)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if API_MD.read_text(encoding="utf-8") != text:
            print(f"{API_MD} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    API_MD.write_text(text, encoding="utf-8")
    print(f"wrote {API_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
