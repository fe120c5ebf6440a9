"""Call strings: ``'dotted.path.ClassName(key=value, ...)'`` parsed with ``ast``, never ``eval``.

A pipeline entry is parsed with ``ast.parse(mode='eval')``; each keyword value must be a literal
(numbers, strings, booleans, None, lists/tuples/dicts of these) (docs/configuration.md#call-strings).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import ConfigError

__all__ = ["CallSpec", "parse_call"]


@dataclass(frozen=True)
class CallSpec:
    """A parsed call string: dotted path and literal keyword arguments."""

    text: str
    path: str
    kwargs: dict[str, Any]
    file: str
    index: int

    @property
    def where(self) -> str:
        return f"pipeline[{self.index}]"


INT64 = 2**63  # TOML integers are 64-bit; so are the call strings' (docs/reliability.md#config-fuzzing)

_LITERAL_HELP = (
    "values must be literals: numbers, strings, true/false (True/False), None, lists, tuples or dicts"
)


def _dotted_name(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _check_literal(node: ast.AST) -> str | None:
    """Return None if ``node`` is an allowed literal, else a description of the offending part."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or node.value is None:
            return None
        if isinstance(node.value, int) and not -INT64 <= node.value < INT64:
            return "integers must fit in 64 bits"
        if isinstance(node.value, int | float | str):
            return None
        return f"{type(node.value).__name__} literals are not allowed"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        if (
            isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            return _check_literal(node.operand)
        return "unary operators are only allowed on numbers"
    if isinstance(node, ast.List | ast.Tuple):
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                return "starred expressions are not allowed"
            problem = _check_literal(elt)
            if problem:
                return problem
        return None
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if key is None:
                return "'**' unpacking is not allowed"
            if not (
                isinstance(key, ast.Constant)
                and isinstance(key.value, str | int)
                and not isinstance(key.value, bool)
            ):
                return "dict keys must be strings or integers"
            problem = _check_literal(value)
            if problem:
                return problem
        return None
    kinds = {
        ast.Call: "a function call",
        ast.Name: "a name",
        ast.Attribute: "an attribute access",
        ast.JoinedStr: "an f-string",
        ast.Lambda: "a lambda",
        ast.Set: "a set",
        ast.BinOp: "an arithmetic expression",
        ast.Subscript: "a subscript",
        ast.Compare: "a comparison",
        ast.ListComp: "a comprehension",
        ast.GeneratorExp: "a generator expression",
        ast.DictComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.IfExp: "a conditional expression",
        ast.NamedExpr: "an assignment expression",
    }
    for typ, text in kinds.items():
        if isinstance(node, typ):
            return f"{text} is not allowed"
    return f"{type(node).__name__} expressions are not allowed"


def parse_call(text: str, *, file: str | Path, index: int) -> CallSpec:
    """Parse one call string without evaluating it.

    Raises
    ------
    ConfigError
        On anything but ``dotted.path(key=literal, ...)``.
    """
    where = f"pipeline[{index}]"
    file = str(file)
    if not isinstance(text, str):
        raise ConfigError(
            f"pipeline entries must be strings, got {type(text).__name__}", file, where, repr(text)
        )
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"malformed call string ({exc.msg})", file, where, text) from None
    except (ValueError, UnicodeError, RecursionError, MemoryError) as exc:
        # NUL bytes, lone surrogates, thousands of nested operators (docs/reliability.md#config-fuzzing)
        reason = "nested too deeply" if isinstance(exc, RecursionError | MemoryError) else str(exc)
        raise ConfigError(f"malformed call string ({reason})", file, where, text) from None
    node = tree.body
    if not isinstance(node, ast.Call):
        raise ConfigError(
            "expected a call such as 'modules.Package.Module.Class(key=value)'", file, where, text
        )
    path = _dotted_name(node.func)
    if path is None:
        raise ConfigError(
            "the callee must be a dotted name such as modules.Package.Module.Class", file, where, text
        )
    if node.args:
        raise ConfigError("positional arguments are not allowed; use key=value", file, where, text)
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ConfigError("'**' keyword unpacking is not allowed", file, where, text)
        if kw.arg in kwargs:
            raise ConfigError(f"duplicate keyword '{kw.arg}'", file, where, text)
        problem = _check_literal(kw.value)
        if problem:
            raise ConfigError(f"keyword '{kw.arg}': {problem}; {_LITERAL_HELP}", file, where, text)
        kwargs[kw.arg] = ast.literal_eval(kw.value)
    return CallSpec(text=text, path=path, kwargs=kwargs, file=file, index=index)
