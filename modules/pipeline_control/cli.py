"""Command line of ``run.py`` (docs/configuration.md#command-line)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import pkgutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from modules.pipeline_control.parameters import class_parameters
from modules.pipeline_control.provenance import code_version
from modules.pipeline_control.resolve import KIND_TEXT, check_allowed, module_kind, resolve_callee
from utils.errors import ConfigError

#: The console command ``pip install`` makes for :func:`main` (pyproject.toml ``[project.scripts]``).
COMMAND = "comap-reduce"


class _UsageError(Exception):
    pass


def parse_obsid_spec(spec: str) -> list[int]:
    """``N``, ``N,M,...`` or ``N-M`` (inclusive) → sorted unique obsids."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo_s, hi_s = part.split("-", 1)
            try:
                lo, hi = int(lo_s), int(hi_s)
            except ValueError:
                raise _UsageError(f"--obsid: '{part}' is not a range N-M") from None
            if hi < lo:
                raise _UsageError(f"--obsid: range '{part}' is empty")
            out.update(range(lo, hi + 1))
        else:
            try:
                out.add(int(part))
            except ValueError:
                raise _UsageError(f"--obsid: '{part}' is not an obsid") from None
    if not out:
        raise _UsageError(f"--obsid: '{spec}' selects nothing")
    return sorted(out)


def program_name() -> str:
    """``comap-reduce`` when started as the installed command, else ``run.py``."""
    return COMMAND if os.path.basename(sys.argv[0] or "") == COMMAND else "run.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name(),
        description="comap-reduce: run the pipeline described by a TOML config "
        "(e.g. parameter_files/main_run.toml).",
    )
    p.add_argument("config", nargs="?", help="TOML config, usually parameter_files/main_run.toml")
    p.add_argument(
        "-C",
        "--chdir",
        metavar="DIR",
        help="change to DIR before anything else: CONFIG and every relative path in the configs "
        "are then relative to DIR (as make -C / git -C)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate all configs, open the DB read-only and print the plan; write nothing",
    )
    p.add_argument(
        "--obsid",
        action="append",
        default=[],
        metavar="SPEC",
        help="restrict to obsids: N, N,M,... or N-M (repeatable)",
    )
    p.add_argument(
        "--nprocess", type=int, default=None, metavar="N", help="override Master.nprocess in every config"
    )
    p.add_argument("--force", action="store_true", help="ignore job states and recompute everything")
    p.add_argument("--retry-failed", action="store_true", help="include observations whose job failed")
    p.add_argument(
        "--create-db",
        action="store_true",
        help="create sql_database if it does not exist (otherwise only DataAcquisition/DataAssess create it)",
    )
    p.add_argument("--mpi", action="store_true", help="use MPI mode (needs mpi4py)")
    p.add_argument(
        "--list-modules", action="store_true", help="print every loadable module with its parameters and exit"
    )
    p.add_argument(
        "--describe",
        metavar="MODULE",
        help="print every parameter of MODULE (dotted path or unique class name) with its type, "
        "default, units and description, and exit",
    )
    p.add_argument(
        "--defaults-toml",
        metavar="MODULE",
        help="print MODULE's TOML section with every parameter at its default, and exit",
    )
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    p.add_argument("--version", action="store_true", help="print the code version and exit")
    return p


# ------------------------------------------------------------------------------------------------
# --list-modules
# ------------------------------------------------------------------------------------------------


@dataclass
class ModuleListing:
    path: str
    kind: str
    summary: str
    parameters: list[tuple[str, str]]


def _walk(prefix: str, errors: list[str]) -> Iterator[str]:
    top = prefix.rstrip(".")
    try:
        pkg = importlib.import_module(top)
    except Exception as exc:
        errors.append(f"{top}: {type(exc).__name__}: {exc}")
        return
    yield top
    paths = getattr(pkg, "__path__", None)
    if not paths:
        return
    for info in pkgutil.walk_packages(
        paths, prefix=top + ".", onerror=lambda name: errors.append(f"{name}: cannot import package")
    ):
        yield info.name


def list_modules(prefixes: Iterable[str] = ("modules.",)) -> tuple[list[ModuleListing], list[str]]:
    """Every loadable pipeline class under the allow-listed prefixes, and the import errors met."""
    from modules.pipeline_control import Pipeline as _base

    base_classes = {_base.BaseCOMAPModule, _base.StreamingStage, _base.PipelineStage, _base.MapJob}
    errors: list[str] = []
    found: dict[str, ModuleListing] = {}
    for prefix in prefixes:
        for modname in _walk(prefix, errors):
            try:
                mod = importlib.import_module(modname)
            except Exception as exc:
                errors.append(f"{modname}: {type(exc).__name__}: {exc}")
                continue
            for _name, obj in vars(mod).items():
                if not isinstance(obj, type) or obj.__module__ != modname or obj in base_classes:
                    continue
                if getattr(obj, "__abstract_module__", False) or _name.startswith("_"):
                    continue
                kind = module_kind(obj)
                if kind is None:
                    continue
                params, _ = class_parameters(obj)
                doc = inspect.getdoc(obj) or ""
                summary = doc.strip().splitlines()[0] if doc.strip() else ""
                path = f"{obj.__module__}.{obj.__qualname__}"
                found[path] = ModuleListing(
                    path=path,
                    kind=kind,
                    summary=summary,
                    parameters=[
                        (n, "required" if p.required else repr(p.default)) for n, p in params.items()
                    ],
                )
    return [found[k] for k in sorted(found)], errors


def print_module_list(prefixes: Iterable[str]) -> int:
    listings, errors = list_modules(prefixes)
    for item in listings:
        print(f"{item.path}  [{item.kind}: {KIND_TEXT[item.kind]}]")
        if item.summary:
            print(f"    {item.summary}")
        for name, default in item.parameters:
            print(f"    {name} = {default}")
    for err in errors:
        print(f"import error: {err}", file=sys.stderr)
    return 0


def _module_paths_from(config: str | None) -> list[str]:
    prefixes = ["modules."]
    if config:
        import tomllib

        try:
            with open(config, "rb") as fh:
                raw = tomllib.load(fh)
            extra = (raw.get("Master") or {}).get("module_paths") or []
            prefixes.extend(str(x) for x in extra)
        except (OSError, ValueError, AttributeError, TypeError):  # load_config reports the problem
            pass
    return prefixes


# ------------------------------------------------------------------------------------------------
# --describe and --defaults-toml (docs/configuration.md#describing-a-module)
# ------------------------------------------------------------------------------------------------


def find_module(name: str, prefixes: Iterable[str] = ("modules.",)) -> type:
    """The pipeline class ``name`` names: a dotted path (as in a call string) or a class name that
    is unique among the listed modules (exact case first, then ignoring case).

    Raises
    ------
    _UsageError
        One line naming the candidates when ``name`` is unknown or ambiguous.
    """
    prefixes = list(prefixes)
    listings, _ = list_modules(prefixes)
    paths = [item.path for item in listings]
    if "." in name:
        module_paths = [p for p in prefixes if p != "modules."]
        if check_allowed(name, module_paths):
            try:
                cls = resolve_callee(name)
            except ConfigError:
                cls = None
            if cls is not None and f"{cls.__module__}.{cls.__qualname__}" in paths:
                return cls
        leaf = name.rsplit(".", 1)[-1]
        close = [p for p in paths if p.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(name, paths)
        raise _UsageError(
            f"unknown module '{name}'"
            + (f"; did you mean: {', '.join(close)}" if close else "; run.py --list-modules lists them")
        )
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == name]
    if not matches:
        matches = [p for p in paths if p.rsplit(".", 1)[-1].lower() == name.lower()]
    if len(matches) == 1:
        return resolve_callee(matches[0])
    if matches:
        raise _UsageError(f"module name '{name}' is ambiguous; candidates: {', '.join(matches)}")
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    raise _UsageError(
        f"unknown module '{name}'; "
        + (f"did you mean: {', '.join(close)}" if close else f"known modules: {', '.join(names)}")
    )


def _describe(name: str, config: str | None, toml: bool) -> int:
    from modules.pipeline_control.module_docs import defaults_toml, describe_text

    try:
        cls = find_module(name, _module_paths_from(config))
    except _UsageError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        return 2
    if toml:
        print(defaults_toml(cls), end="")
    else:
        kind = module_kind(cls) or ""
        print(describe_text(cls, f"{kind}: {KIND_TEXT.get(kind, '')}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.chdir is not None:
        try:
            os.chdir(args.chdir)
        except OSError as exc:
            print(f"{prog}: error: --chdir {args.chdir}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if args.version:
        print(code_version())
        return 0
    if args.describe or args.defaults_toml:
        return _describe(args.describe or args.defaults_toml, args.config, toml=bool(args.defaults_toml))
    if args.list_modules:
        return print_module_list(_module_paths_from(args.config))
    if not args.config:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: CONFIG is required (e.g. parameter_files/main_run.toml)", file=sys.stderr)
        return 2
    try:
        obsids = sorted({o for spec in args.obsid for o in parse_obsid_spec(spec)}) if args.obsid else None
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.nprocess is not None and args.nprocess < 1:
        print(f"{prog}: error: --nprocess must be >= 1", file=sys.stderr)
        return 2
    from modules.pipeline_control.runner import run_pipeline

    try:
        return run_pipeline(
            args.config,
            dry_run=args.dry_run,
            obsids=obsids,
            nprocess=args.nprocess,
            force=args.force,
            retry_failed=args.retry_failed,
            create_db=args.create_db,
            mpi=args.mpi,
            log_level=args.log_level,
        )
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # docs/reliability.md#signals
