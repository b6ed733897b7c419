"""The public names: what each public namespace exports, and what they say of themselves."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import keepconn
from keepconn._core import errors

NAMESPACES = [
    "keepconn",
    "keepconn.tcp",
    "keepconn.client",
    "keepconn.testing",
    "keepconn.metrics",
    "keepconn.cluster",
]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_all_lists_exactly_the_public_names(namespace: str) -> None:
    module = importlib.import_module(namespace)
    held = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        # Subpackages appear as attributes once imported, and `annotations` is the
        # __future__ feature: neither is an export.
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert sorted(held) == sorted(module.__all__)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_public_classes_and_functions_say_where_to_import_them_from(namespace: str) -> None:
    module = importlib.import_module(namespace)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == namespace, f"{namespace}.{name}: {value.__module__}"
            assert value.__doc__, f"{namespace}.{name} has no docstring"


def defined_exceptions() -> set[str]:
    found = set()
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and issubclass(value, BaseException):
                short = namespace.removeprefix("keepconn").lstrip(".")
                found.add(f"{short}.{name}" if short else name)
    return found


def test_the_exception_tree_names_every_exception() -> None:
    tree = errors.__doc__ or ""
    exceptions = defined_exceptions()
    assert {"KeepconnError", "tcp.UnsupportedOption", "testing.NetnsError"} <= exceptions
    for name in exceptions:
        assert name in tree, f"{name} is missing from keepconn._core.errors' docstring"


def test_every_exception_derives_from_keepconn_error() -> None:
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and issubclass(value, BaseException):
                assert issubclass(value, keepconn.KeepconnError), f"{namespace}.{name}"
