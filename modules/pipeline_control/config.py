"""TOML configs: loading, call-string parsing (``ast``, never ``eval``), merging and validation.

A pipeline entry is a call string ``'dotted.path.ClassName(key=value, ...)'`` (00 §6.2). It is
parsed with ``ast.parse(mode='eval')``; each keyword value must be a literal (numbers, strings,
booleans, None, lists/tuples/dicts of these). The callee must lie under an allow-listed prefix
(``modules.`` or ``Master.module_paths``) before anything is imported.

Parameters are merged class defaults < TOML section < call keywords (00 §6.3), then checked
against the ``__init__`` signature and simple annotations, then by the class's own
``validate_config``. Every problem in every reachable config file is collected and reported
together as ``ConfigError: <file>: <where>: <message>: <text>`` (00 §6.4).
"""

from __future__ import annotations

import ast
import datetime as _dt
import importlib
import inspect
import logging
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.pipeline_control.provenance import sha256_of
from utils.errors import ConfigError, ConfigErrors

log = logging.getLogger("comap.config")

DEFAULT_MODULE_PREFIX = "modules."

# ------------------------------------------------------------------------------------------------
# [Master] keys per kind of file (00 §6.5)
# ------------------------------------------------------------------------------------------------


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_or_list(v: Any) -> bool:
    return _is_str(v) or _is_str_list(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_obsid_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(_is_int(x) for x in v))


_MAIN_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "log_file": (_is_str, "a string"),
    "sql_database": (_is_str, "a path or SQLAlchemy URL string"),
    "pipeline": (_is_str_list, "a list of call strings"),
    "module_paths": (_is_str_list, "a list of module-path prefixes"),
}
_LEVEL2_KEYS = {
    **_MAIN_KEYS,
    "source": (_is_str_or_list, "a string or list of strings"),
    "source_group": (_is_str_or_list, "a string or list of strings"),
    "target_obsid": (_is_obsid_list, "a list of obsids or a path to a text file"),
    "min_obsid": (_is_int, "an integer"),
    "max_obsid": (_is_int, "an integer"),
    "nprocess": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "force_run": (lambda v: isinstance(v, bool), "true or false"),
}
_MAP_KEYS = {
    **_MAIN_KEYS,
    "min_obsid": _LEVEL2_KEYS["min_obsid"],
    "max_obsid": _LEVEL2_KEYS["max_obsid"],
    "obsid_list": (_is_obsid_list, "a list of obsids or a path to a text file"),
    "nprocess": _LEVEL2_KEYS["nprocess"],
}
MASTER_KEYS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "main": _MAIN_KEYS,
    "level2": _LEVEL2_KEYS,
    "map": _MAP_KEYS,
}
MASTER_DEFAULTS: dict[str, Any] = {
    "log_file": "logs/{timestamp}_{config}.log",
    "sql_database": "databases/COMAP_manchester.db",
    "module_paths": [],
    "source": None,
    "source_group": None,
    "target_obsid": None,
    "min_obsid": 0,
    "max_obsid": None,
    "obsid_list": None,
    "nprocess": 1,
    "force_run": False,
}

# Kinds of classes a list may hold (00 §5).
LIST_KINDS: dict[str, frozenset[str]] = {
    "main": frozenset({"stage"}),
    "level2": frozenset({"per_observation", "streaming"}),
    "map": frozenset({"map_job"}),
}
KIND_TEXT = {
    "stage": "a top-level stage (PipelineStage)",
    "per_observation": "a per-observation module (BaseCOMAPModule)",
    "streaming": "a streaming stage (StreamingStage)",
    "map_job": "a map job (CreateMap)",
}
FILE_KIND_TEXT = {"main": "main config", "level2": "level-2 config", "map": "map-making config"}

_LOG_PLACEHOLDERS = {"timestamp", "config", "run_id"}


# ------------------------------------------------------------------------------------------------
# Data classes
# ------------------------------------------------------------------------------------------------


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


@dataclass
class ModuleSpec:
    """A validated pipeline entry: the class, its kind and its fully resolved parameters."""

    call: CallSpec
    cls: type
    kind: str
    params: dict[str, Any]
    section_key: str | None = None

    @property
    def class_path(self) -> str:
        """Canonical dotted path ``cls.__module__ + '.' + cls.__qualname__``."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def params_sha256(self) -> str:
        return sha256_of(self.params)

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``cls(**kwargs)``."""
        return dict(self.params)

    def instantiate(self) -> Any:
        """Instantiate the class with the resolved parameters and attach the spec to it."""
        obj = self.cls(**self.init_kwargs())
        try:
            obj._comap_spec = self
        except AttributeError:  # __slots__ classes: provenance falls back to introspection
            pass
        return obj


@dataclass
class LoadedConfig:
    """One TOML file after parsing and validation."""

    path: Path
    kind: str
    raw: dict[str, Any]
    master: dict[str, Any]
    entries: list[ModuleSpec] = field(default_factory=list)
    parent: LoadedConfig | None = None

    @property
    def sha256(self) -> str:
        """Hash of the resolved pipeline (class paths and parameters), used as ``config_sha256``."""
        return sha256_of([{"class": e.class_path, "params": e.params} for e in self.entries])

    def resolved_dict(self) -> dict[str, Any]:
        """Master and entries as plain data, ``None`` values listed in ``_none_keys`` (00 §6.6)."""
        return {
            "file": str(self.path),
            "kind": self.kind,
            "Master": _drop_none(self.master),
            "pipeline": [
                {"class": e.class_path, "call": e.call.text, "params": _drop_none(e.params)}
                for e in self.entries
            ],
        }


@dataclass
class RunConfig:
    """The main config and every sub-config reachable from it, validated together."""

    main: LoadedConfig
    sub_configs: dict[str, LoadedConfig] = field(default_factory=dict)
    implicit_level2: bool = False

    def all_configs(self) -> list[LoadedConfig]:
        return [self.main, *self.sub_configs.values()]

    def resolved_dict(self) -> dict[str, Any]:
        out = {"main": self.main.resolved_dict()}
        if self.sub_configs:
            out["sub_configs"] = {key: cfg.resolved_dict() for key, cfg in self.sub_configs.items()}
        return out


class ErrorCollector:
    """Collects ConfigErrors so that every problem is reported at once."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(
        self, message: str, file: str | Path | None = None, where: str | None = None, text: str | None = None
    ) -> None:
        self.errors.append(ConfigError(message, None if file is None else str(file), where, text))

    def extend(self, errors: Iterable[ConfigError]) -> None:
        self.errors.extend(errors)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)

    def __bool__(self) -> bool:
        return bool(self.errors)


# ------------------------------------------------------------------------------------------------
# Call strings
# ------------------------------------------------------------------------------------------------

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
        if isinstance(node.value, int | float | str):
            return None
        return f"{type(node.value).__name__} literals are not allowed"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        if (
            isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            return None
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


def check_allowed(path: str, module_paths: Iterable[str]) -> bool:
    """True if the dotted ``path`` starts with ``modules.`` or an allow-listed prefix."""
    prefixes = [DEFAULT_MODULE_PREFIX, *module_paths]
    for prefix in prefixes:
        p = prefix if prefix.endswith(".") else prefix + "."
        if path.startswith(p) and len(path) > len(p):
            return True
    return False


def resolve_callee(
    path: str, *, file: str | None = None, where: str | None = None, text: str | None = None
) -> type:
    """Import the longest importable module prefix of ``path``, then ``getattr`` the rest.

    A module that contains a class of its own name resolves to that class, so both
    ``pkg.Name.Name`` and ``pkg.Name.Name.Name`` work (00 §6.2 rule 5).
    """
    parts = path.split(".")
    obj: Any = None
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (modname == missing or modname.startswith(missing + ".")):
                continue
            raise ConfigError(f"importing {modname} failed: {exc}", file, where, text) from None
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"importing {modname} failed: {type(exc).__name__}: {exc}", file, where, text
            ) from None
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ConfigError(
                    f"unknown module: {modname} has no attribute '{attr}'", file, where, text
                ) from None
        break
    else:
        raise ConfigError(f"unknown module: cannot import any part of {path}", file, where, text)
    if isinstance(obj, types.ModuleType):
        leaf = obj.__name__.rsplit(".", 1)[-1]
        candidate = getattr(obj, leaf, None)
        if isinstance(candidate, type):
            obj = candidate
        else:
            raise ConfigError(f"unknown module: module {obj.__name__} has no class {leaf}", file, where, text)
    if not isinstance(obj, type):
        raise ConfigError(f"{path} is not a class", file, where, text)
    return obj


def module_kind(cls: type) -> str | None:
    """Classify a class as ``stage``, ``streaming``, ``per_observation`` or ``map_job`` (00 §5)."""
    from modules.pipeline_control.Pipeline import BaseCOMAPModule, MapJob, PipelineStage, StreamingStage

    if issubclass(cls, PipelineStage):
        return "stage"
    if issubclass(cls, StreamingStage):
        return "streaming"
    if issubclass(cls, MapJob):
        return "map_job"
    if issubclass(cls, BaseCOMAPModule):
        return "per_observation"
    if callable(getattr(cls, "run", None)) and callable(getattr(cls, "already_processed", None)):
        return "per_observation"
    return None


# ------------------------------------------------------------------------------------------------
# Signatures and annotations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    name: str
    default: Any
    required: bool
    annotation: Any


def class_parameters(cls: type) -> tuple[dict[str, ParamInfo], bool]:
    """Parameters of ``cls.__init__`` (without ``self``) and whether it accepts ``**kwargs``."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}, True
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    params: dict[str, ParamInfo] = {}
    var_kw = False
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0 and name == "self":
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        required = p.default is inspect.Parameter.empty
        params[name] = ParamInfo(
            name, None if required else p.default, required, hints.get(name, p.annotation)
        )
    return params, var_kw


_SIMPLE = {bool, int, float, str, list, dict, tuple}


def _annotation_options(ann: Any) -> list[Any] | None:
    """Flatten a simple annotation into allowed base types; None if not simple (not checked)."""
    if ann is inspect.Parameter.empty or ann is Any:
        return None
    if isinstance(ann, str):
        return None
    if ann is None or ann is type(None):
        return [type(None)]
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(ann):
            sub = _annotation_options(arg)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if origin in (list, tuple, dict):
        return [origin]
    if origin is typing.Literal:
        return None
    if ann in _SIMPLE:
        return [ann]
    return None


def _matches(value: Any, options: list[Any]) -> bool:
    for opt in options:
        if opt is type(None) and value is None:
            return True
        if opt is bool and isinstance(value, bool):
            return True
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if opt is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if opt is str and isinstance(value, str):
            return True
        if opt in (list, tuple) and isinstance(value, list | tuple):
            return True
        if opt is dict and isinstance(value, dict):
            return True
    return False


def _annotation_text(ann: Any) -> str:
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _navigate(raw: Mapping[str, Any], dotted: str) -> dict[str, Any] | None:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _section_candidates(path: str, cls: type) -> list[str]:
    canonical = f"{cls.__module__}.{cls.__qualname__}"
    keys = [path, canonical]
    if cls.__module__.rsplit(".", 1)[-1] == cls.__name__:
        keys.append(cls.__module__)
    out: list[str] = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def _section_params(raw: Mapping[str, Any], key: str, all_keys: list[str]) -> dict[str, Any]:
    node = _navigate(raw, key)
    if not node:
        return {}
    params = dict(node)
    # A longer candidate key nests inside this table; its sub-table is not a parameter here.
    for other in all_keys:
        if other != key and other.startswith(key + "."):
            nxt = other[len(key) + 1 :].split(".", 1)[0]
            if isinstance(params.get(nxt), dict):
                params.pop(nxt)
    return params


def _all_sections(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of tables holding at least one non-table value (candidate class sections)."""
    out: list[str] = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            continue
        dotted = f"{prefix}{key}"
        if dotted == "Master":
            continue
        if any(not isinstance(v, dict) for v in value.values()):
            out.append(dotted)
        out.extend(_all_sections(value, dotted + "."))
    return out


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def read_toml(path: Path, errors: ErrorCollector) -> dict[str, Any] | None:
    """Read a TOML file; report a missing file or a syntax error (with line and column)."""
    if not path.exists():
        errors.add("config file not found", path, "file")
        return None
    if not path.is_file():
        errors.add("config path is not a file", path, "file")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.add(f"cannot read config file: {exc}", path, "file")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS.search(msg)
        where, line_text = "TOML", None
        if m:
            line_no = int(m.group(1))
            where = f"line {line_no}, column {m.group(2)}"
            lines = text.splitlines()
            if 1 <= line_no <= len(lines):
                line_text = lines[line_no - 1].strip()
            msg = _TOML_POS.sub("", msg).strip()
        errors.add(f"TOML syntax error: {msg}", path, where, line_text)
        return None


def _validate_master(
    raw: Mapping[str, Any], path: Path, kind: str, errors: ErrorCollector, parent: LoadedConfig | None
) -> dict[str, Any] | None:
    master_raw = raw.get("Master")
    if not isinstance(master_raw, dict):
        errors.add("missing [Master] table", path, "[Master]")
        return None
    allowed = MASTER_KEYS[kind]
    master: dict[str, Any] = {}
    for key, value in master_raw.items():
        if key not in allowed:
            errors.add(
                f"unknown key '{key}' for a {FILE_KIND_TEXT[kind]}; known keys: {', '.join(sorted(allowed))}",
                path,
                "[Master]",
                f"{key} = {value!r}",
            )
            continue
        check, text = allowed[key]
        if not check(value):
            errors.add(f"'{key}' must be {text}", path, "[Master]", f"{key} = {value!r}")
            continue
        master[key] = value
    if "pipeline" not in master_raw:
        errors.add("[Master] has no 'pipeline' list", path, "[Master]")
    for key in allowed:
        if key in master:
            continue
        if parent is not None and key in ("sql_database", "module_paths"):
            master[key] = parent.master.get(key, MASTER_DEFAULTS[key])
        else:
            master[key] = MASTER_DEFAULTS.get(key)
    if parent is not None and "log_file" in master_raw:
        log.info("%s: [Master] log_file is ignored under a main config (one log per run)", path)
    if isinstance(master.get("log_file"), str):
        for name in re.findall(r"\{([^}]*)\}", master["log_file"]):
            if name not in _LOG_PLACEHOLDERS:
                errors.add(
                    f"unknown log_file placeholder '{{{name}}}'; known: "
                    "{timestamp}, {config}, {run_id}",
                    path,
                    "[Master] log_file",
                    master["log_file"],
                )
    return master


def _resolve_entry(
    raw: Mapping[str, Any],
    call: CallSpec,
    kind_allowed: frozenset[str],
    file_kind: str,
    module_paths: list[str],
    errors: ErrorCollector,
    used_sections: set[str],
) -> ModuleSpec | None:
    if not check_allowed(call.path, module_paths):
        errors.add(
            "module path not allowed: it must start with 'modules.'"
            + (f" or one of {module_paths}" if module_paths else "")
            + " (add a prefix to [Master] module_paths)",
            call.file,
            call.where,
            call.text,
        )
        return None
    try:
        cls = resolve_callee(call.path, file=call.file, where=call.where, text=call.text)
    except ConfigError as exc:
        errors.extend([exc])
        return None
    kind = module_kind(cls)
    if kind is None or kind not in kind_allowed:
        allowed = " or ".join(KIND_TEXT[k] for k in sorted(kind_allowed))
        got = KIND_TEXT.get(kind, "not a pipeline module") if kind else "not a pipeline module"
        errors.add(
            f"{cls.__name__} is {got}; a {FILE_KIND_TEXT[file_kind]} list takes {allowed}",
            call.file,
            call.where,
            call.text,
        )
        return None

    # Sections: as written, canonical, and module form (00 §6.3).
    candidates = _section_candidates(call.path, cls)
    found = {k: p for k in candidates if (p := _section_params(raw, k, candidates))}
    section_key = None
    section: dict[str, Any] = {}
    if len(found) > 1:
        errors.add(
            "parameters for this class are given under more than one section: "
            + ", ".join(f"[{k}]" for k in found),
            call.file,
            call.where,
            call.text,
        )
    elif found:
        section_key, section = next(iter(found.items()))
    used_sections.update(found)

    params_info, var_kw = class_parameters(cls)
    resolved: dict[str, Any] = {n: p.default for n, p in params_info.items() if not p.required}
    ok = True
    for source_name, src in (("section", section), ("call", call.kwargs)):
        for key, value in src.items():
            if key not in params_info:
                if var_kw:
                    log.warning(
                        "%s: %s: %s accepts **kwargs; passing unknown keyword '%s'",
                        call.file,
                        call.where,
                        cls.__name__,
                        key,
                    )
                else:
                    where = call.where if source_name == "call" else f"[{section_key}]"
                    errors.add(
                        f"unknown keyword '{key}' for {cls.__name__}; known keywords: "
                        f"{', '.join(params_info) or '(none)'}",
                        call.file,
                        where,
                        call.text if source_name == "call" else f"{key} = {value!r}",
                    )
                    ok = False
                    continue
            resolved[key] = value
    for name, info in params_info.items():
        if info.required and name not in resolved:
            errors.add(
                f"missing required keyword '{name}' for {cls.__name__}", call.file, call.where, call.text
            )
            ok = False
    for name, value in resolved.items():
        info = params_info.get(name)
        if info is None:
            continue
        options = _annotation_options(info.annotation)
        if options is not None and not _matches(value, options):
            errors.add(
                f"keyword '{name}' of {cls.__name__} must be {_annotation_text(info.annotation)}, "
                f"got {type(value).__name__} {value!r}",
                call.file,
                call.where,
                call.text,
            )
            ok = False
    if not ok:
        return None
    validator = getattr(cls, "validate_config", None)
    if callable(validator):
        try:
            problems = validator(dict(resolved)) or []
        except Exception as exc:  # a validator bug must not hide the other errors
            problems = [f"validate_config raised {type(exc).__name__}: {exc}"]
        for problem in problems:
            errors.add(str(problem), call.file, f"{call.where} {cls.__name__}", call.text)
        if problems:
            return None
    return ModuleSpec(call=call, cls=cls, kind=kind, params=resolved, section_key=section_key)


def load_config(
    path: str | Path,
    kind: str,
    errors: ErrorCollector,
    *,
    parent: LoadedConfig | None = None,
    master_overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig | None:
    """Load and validate one config file of ``kind`` (``main``, ``level2`` or ``map``).

    Problems are added to ``errors``; the return value is None if the file could not be used at all.
    ``master_overrides`` (from the CLI) replace Master keys valid for this kind.
    """
    path = Path(path)
    raw = read_toml(path, errors)
    if raw is None:
        return None
    master = _validate_master(raw, path, kind, errors, parent)
    if master is None:
        return None
    for key, value in (master_overrides or {}).items():
        if key in MASTER_KEYS[kind] and value is not None:
            master[key] = value
    module_paths = list(master.get("module_paths") or [])
    for prefix in module_paths:
        top = prefix.rstrip(".").split(".")[0]
        try:
            importlib.import_module(top)
        except Exception as exc:
            errors.add(
                f"module_paths prefix '{prefix}' is not importable: {exc}",
                path,
                "[Master] module_paths",
                prefix,
            )
    cfg = LoadedConfig(path=path, kind=kind, raw=raw, master=master, parent=parent)
    used: set[str] = set()
    for index, text in enumerate(master.get("pipeline") or []):
        try:
            call = parse_call(text, file=path, index=index)
        except ConfigError as exc:
            errors.extend([exc])
            continue
        spec = _resolve_entry(raw, call, LIST_KINDS[kind], kind, module_paths, errors, used)
        if spec is not None:
            cfg.entries.append(spec)
    for section in _all_sections(raw):
        if section not in used:
            log.info("%s: section [%s] matches no pipeline entry", path, section)
    return cfg


def detect_file_kind(raw: Mapping[str, Any] | None) -> str:
    """Guess whether a file given to ``run.py`` is a main config or a bare level-2 config.

    A main config whose pipeline holds only per-observation modules is run as
    ``Level2Pipeline(config_file=CONFIG)`` (00 §5 rule 4).
    """
    if not raw:
        return "main"
    pipeline = (raw.get("Master") or {}).get("pipeline") or []
    kinds = set()
    for i, text in enumerate(pipeline):
        try:
            call = parse_call(text, file="?", index=i)
            cls = resolve_callee(call.path)
        except ConfigError:
            return "main"
        kinds.add(module_kind(cls))
    if kinds and kinds <= {"per_observation", "streaming"}:
        return "level2"
    return "main"


LEVEL2_PIPELINE_PATH = "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline"


def load_run_config(
    config_path: str | Path, *, master_overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Load the main config and every config reachable from it, reporting all problems at once.

    Raises
    ------
    ConfigErrors
        If any file has any problem. Nothing has been run at that point.
    """
    errors = ErrorCollector()
    path = Path(config_path)
    raw_probe = None
    if path.is_file():
        try:
            raw_probe = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            raw_probe = None
    implicit = detect_file_kind(raw_probe) == "level2"
    if implicit:
        # A bare level-2 config: run it as Level2Pipeline(config_file=CONFIG).
        main = LoadedConfig(path=path, kind="main", raw={}, master=dict(MASTER_DEFAULTS), parent=None)
        master_raw = (raw_probe or {}).get("Master") or {}
        for key in ("log_file", "sql_database", "module_paths"):
            if key in master_raw:
                main.master[key] = master_raw[key]
        for key, value in (master_overrides or {}).items():
            if key in MASTER_KEYS["main"] and value is not None:
                main.master[key] = value
        text = f"{LEVEL2_PIPELINE_PATH}(config_file={str(path)!r})"
        call = parse_call(text, file=path, index=0)
        spec = _resolve_entry({}, call, LIST_KINDS["main"], "main", [], errors, set())
        if spec is not None:
            main.entries.append(spec)
    else:
        main = load_config(path, "main", errors, master_overrides=master_overrides)
    run = RunConfig(main=main, implicit_level2=implicit) if main is not None else None
    if run is not None:
        for spec in main.entries:
            sub_kind = getattr(spec.cls, "sub_config_kind", None)
            sub_path = spec.params.get("config_file")
            if not sub_kind or not sub_path:
                continue
            key = str(sub_path)
            if key in run.sub_configs:
                continue
            sub = load_config(sub_path, sub_kind, errors, parent=main, master_overrides=master_overrides)
            if sub is None:
                # name the stage that pointed at the missing or broken file
                last = errors.errors[-1] if errors.errors else None
                if last is not None and last.file == str(Path(sub_path)) and last.where == "file":
                    last.where = f"file (config_file of {spec.name} in {main.path})"
                continue
            run.sub_configs[key] = sub
            checker = getattr(spec.cls, "validate_sub_config", None)
            if callable(checker):
                for problem in checker(sub) or []:
                    if isinstance(problem, ConfigError):
                        errors.extend([problem])
                    else:
                        errors.add(str(problem), sub.path, "pipeline")
    errors.raise_if_any()
    assert run is not None
    return run


# ------------------------------------------------------------------------------------------------
# Resolved-config dump
# ------------------------------------------------------------------------------------------------


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    none_keys: list[str] = []
    for k, v in d.items():
        if v is None:
            none_keys.append(k)
        elif isinstance(v, Mapping):
            out[k] = _drop_none(v)
        elif isinstance(v, tuple | list):
            out[k] = [(_drop_none(x) if isinstance(x, Mapping) else x) for x in v if x is not None]
        else:
            out[k] = v
    if none_keys:
        out["_none_keys"] = none_keys
    return out


def dump_toml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as TOML atomically (temporary name, then ``os.replace``)."""
    import os

    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as fh:
        tomli_w.dump(_tomlable(data), fh)
    os.replace(tmp, path)
    return path


def _tomlable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _tomlable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_tomlable(v) for v in obj if v is not None]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, _dt.datetime):
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
