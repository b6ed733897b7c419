"""The reference of keepconn's public namespaces, generated from each one's ``__all__``.

``.. keepconn-namespace:: keepconn.tcp`` documents the module's docstring and then every name in
its ``__all__``: classes, exceptions, functions and data, each by autodoc. A new public name is
in the reference as soon as it is exported; a new namespace needs one page holding this one
directive (tests/test_docs.py checks that every name of every namespace made it in).

Configuration records and events are attrs classes: their fields are shown as one table (type,
default, allowed values read off the validators, the field's ``#:`` comment), because autodoc
would look for those comments in the public namespace's module, which each class claims as its
``__module__`` (keepconn._public.claim), instead of the private module that defines it.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
import types
from typing import Any

import attrs
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

KINDS = ("Classes", "Exceptions", "Functions", "Data")


def kind_of(value: Any) -> str:
    """Which heading of a namespace's page a public name goes under."""
    if inspect.isclass(value):
        return "Exceptions" if issubclass(value, BaseException) else "Classes"
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        return "Functions"
    return "Data"


class NamespaceDirective(SphinxDirective):
    """``.. keepconn-namespace:: NAME``: the module docstring, then every name of ``__all__``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        module = importlib.import_module(name)
        adopt_comments(module)
        groups: dict[str, list[str]] = {kind: [] for kind in KINDS}
        for public in module.__all__:
            groups[kind_of(getattr(module, public))].append(public)
        lines = [f".. automodule:: {name}", "   :no-members:", ""]
        for kind in KINDS:
            if not groups[kind]:
                continue
            lines += [kind, "-" * len(kind), ""]
            for public in groups[kind]:
                lines += entry(name, public, getattr(module, public))
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(
            self.state, StringList(lines, source=f"<keepconn-namespace {name}>"), container
        )
        return list(container.children)


def entry(namespace: str, name: str, value: Any) -> list[str]:
    """The autodoc directive for one public name."""
    kind = kind_of(value)
    if kind == "Functions":
        return [f".. autofunction:: {namespace}.{name}", ""]
    if kind == "Data":
        return data_entry(namespace, name, value)
    directive = "autoexception" if kind == "Exceptions" else "autoclass"
    lines = [
        f".. auto{directive[4:]}:: {namespace}.{name}",
        "   :members:",
        "   :show-inheritance:",
    ]
    if isinstance(value, enum.EnumMeta):
        lines.append("   :undoc-members:")
    if any(is_private(base) for base in value.__mro__[1:]):
        # What a private base defines (Connection.receive, say) is part of the public class.
        lines.append("   :inherited-members:")
    return lines + [""]


def is_private(cls: type) -> bool:
    """A keepconn class no public namespace exports: its module is private, and unclaimed."""
    module = getattr(cls, "__module__", "") or ""
    return module.startswith("keepconn.") and any(
        part.startswith("_") for part in module.split(".")
    )


def public_bases(app: Sphinx, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """``autodoc-process-bases``: name a private base's own bases instead of the private class."""
    shown: list[Any] = []
    for base in bases:
        origin = getattr(base, "__origin__", base)  # StreamConnection[F, CloseReason]
        if inspect.isclass(origin) and is_private(origin):
            shown += [b for b in origin.__bases__ if b not in (object,) and b not in shown]
        else:
            shown.append(base)
    bases[:] = [base for base in shown if getattr(base, "__name__", "") != "Generic"] or [object]


def data_entry(namespace: str, name: str, value: Any) -> list[str]:
    """A public constant, with the ``#:`` comment of the module that defines it.

    autodoc's own ``autodata`` would read the comment in the public namespace's module, find
    none, and show the docstring of the value's type (``dict``'s, say) instead.
    """
    comment: list[str] = []
    for modname, module in list(sys.modules.items()):
        if modname.startswith("keepconn.") and vars(module).get(name) is value:
            try:
                found = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", name))
            except Exception:  # noqa: BLE001 - a module without source has no comments
                found = None
            if found:
                comment = [line for line in found if line.strip() or comment]
                break
    shown = repr(value)
    lines = [f".. py:data:: {name}", f"   :module: {namespace}"]
    if len(shown) <= 160:
        lines.append(f"   :value: {shown}")
    lines.append("")
    lines += [f"   {line}" if line.strip() else "" for line in comment]
    return lines + [""]


def adopt_comments(module: types.ModuleType) -> None:
    """Teach autodoc's source analyzer of a public namespace the ``#:`` comments of its names.

    autodoc reads attribute comments (an enum member's, a NamedTuple field's, a property's
    neighbours) from the module a class names as its ``__module__``: the public namespace
    (keepconn._public.claim), whose source holds only imports. Its analyzer gets the comments,
    annotations and source order of each exported class from the private module defining it.
    """
    public = ModuleAnalyzer.for_module(module.__name__)
    public.analyze()
    for name in module.__all__:
        value = getattr(module, name)
        if not inspect.isclass(value):
            continue
        source = defining_module(value)
        if source is None:
            continue
        private = ModuleAnalyzer.for_module(source)
        private.analyze()
        prefix = value.__qualname__
        # An attrs field's comment is in its class's fields table; adopted, it would come back
        # as a member of its own.
        in_table = set(attrs.fields_dict(value)) if attrs.has(value) else set()
        for key, comment in private.attr_docs.items():
            if key[0] == prefix and key[1] in in_table:
                continue
            if key[0] == prefix or key[0].startswith(prefix + "."):
                public.attr_docs.setdefault(key, comment)
        for key, annotation in private.annotations.items():
            if key[0] == prefix or key[0].startswith(prefix + "."):
                public.annotations.setdefault(key, annotation)
        for tag, order in private.tagorder.items():
            if tag == prefix or tag.startswith(prefix + "."):
                public.tagorder.setdefault(tag, order)


def defining_module(cls: type) -> str | None:
    """The private module whose source defines ``cls`` (its ``__module__`` names the public one)."""
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("keepconn.") or not isinstance(module, types.ModuleType):
            continue
        if vars(module).get(cls.__name__) is not cls:
            continue
        try:
            defs = ModuleAnalyzer.for_module(modname).find_tags()
        except Exception:  # noqa: BLE001 - a module without source defines nothing to read
            continue
        if defs.get(cls.__qualname__, ("",))[0] == "class":
            return modname
    return None


def allowed(validator: Any) -> str:
    """What a field's validator lets through, in words."""
    if validator is None:
        return ""
    if inspect.isfunction(validator):
        # keepconn's own validators say their range in their docstring (_core/validate.py).
        is_ours = validator.__module__.startswith("keepconn.")
        return validator.__doc__ or "" if is_ours else ""
    options = getattr(validator, "options", None)
    if options is not None:
        return "one of " + ", ".join(f"``{option!r}``" for option in options)
    inner = getattr(validator, "validator", None)  # attrs.validators.optional
    if inner is not None:
        text = allowed(inner)
        return f"{text}, or None" if text else ""
    parts = getattr(validator, "_validators", None)  # attrs.validators.and_
    if parts:
        return "; ".join(filter(None, (allowed(part) for part in parts)))
    kind = getattr(validator, "type", None)  # attrs.validators.instance_of
    if isinstance(kind, type):
        return f"a {kind.__name__}"
    return ""


def default_of(field: attrs.Attribute[Any]) -> str:
    """A field's default, as a user would write it."""
    if field.default is attrs.NOTHING:
        return "required"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        factory = field.default.factory  # type: ignore[attr-defined]
        return f"``{getattr(factory, '__name__', repr(factory))}()``"
    return f"``{field.default!r}``"


def fields_table(cls: type) -> list[str]:
    """The reST table of an attrs class's fields."""
    modname = defining_module(cls)
    docs: dict[tuple[str, str], list[str]] = {}
    if modname is not None:
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    rows = []
    validated = False
    for field in attrs.fields(cls):
        if not field.init or field.name.startswith("_"):
            continue  # private state, set through the constructor's other arguments
        comment = " ".join(line.strip() for line in docs.get((cls.__qualname__, field.name), []))
        rule = allowed(field.validator)
        validated = validated or bool(rule)
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        rows.append(
            (f"``{field.name}``", f"``{kind}``" if kind else "", default_of(field), rule, comment)
        )
    if not rows:
        return []
    lines = ["", ".. list-table:: Fields", "   :header-rows: 1", "   :widths: 15 15 12 18 40", ""]
    lines += ["   * - field", "     - type", "     - default", "     - allowed", "     - meaning"]
    for row in rows:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    if validated:
        lines += [
            "",
            ":raises keepconn.ConfigError: when a field is outside what it allows (the message"
            " names the field, the value and the range).",
        ]
    return lines + [""]


def add_fields(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """``autodoc-process-docstring``: append the fields table to an attrs class's docstring."""
    if what in ("class", "exception") and inspect.isclass(obj) and attrs.has(obj):
        lines.extend(fields_table(obj))


def skip_fields(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """``autodoc-skip-member``: an attrs field is in its class's table, not a member of its own."""
    owner = getattr(obj, "__objclass__", None)
    if inspect.isclass(owner) and attrs.has(owner) and name in attrs.fields_dict(owner):
        return True
    return None


def attrs_defaults(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """``autodoc-process-signature``: an attrs class's defaults as a user writes them.

    attrs generates ``__init__``, so ``autodoc_preserve_defaults`` finds the generated source
    (``attr_dict['idle_timeout'].default``, ``NOTHING`` for a factory) instead of the value.
    """
    if signature is None or not (inspect.isclass(obj) and attrs.has(obj)):
        return None
    shown = {
        field.alias or field.name: default_of(field).strip("`")
        for field in attrs.fields(obj)
        if field.default is not attrs.NOTHING
    }
    params = []
    for param in top_level_split(signature.strip()[1:-1]):
        key = param.split(":")[0].split("=")[0].strip()
        if key in shown and "=" in param:
            param = param[: param.rindex("=")] + "= " + shown[key]
        params.append(param)
    return "(" + ", ".join(params) + ")", return_annotation


def top_level_split(text: str) -> list[str]:
    """Split a parameter list at its commas, not at those inside brackets or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directive and the attrs hooks."""
    app.add_directive("keepconn-namespace", NamespaceDirective)
    app.connect("autodoc-process-docstring", add_fields)
    app.connect("autodoc-skip-member", skip_fields)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("autodoc-process-signature", attrs_defaults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
