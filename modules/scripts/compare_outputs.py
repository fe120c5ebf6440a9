"""Compare two pipeline output trees: level-2 HDF5 files, FITS maps and cubes, calibration JSON.

``python -m modules.scripts.compare_outputs REFERENCE CANDIDATE [--atol-arcsec X] [--ignore-attr NAME]``

Used to check that a change of code keeps what the pipeline writes. Files are matched by their path
relative to each tree. Every HDF5 dataset is compared value by value (NaN equals NaN) together with
its dtype, shape and attributes; every FITS HDU by data and header; JSON files key by key.
Provenance and time stamps (code version, creation times, resolved parameters, file paths, wall-clock
durations) are not compared. Pointing datasets (``*_ra``, ``*_dec``, ``*_az``, ``*_el`` in degrees) may
differ by at most ``--atol-arcsec`` (default 0: bit identity).

Exit status 0 when the trees agree, 1 when they differ, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy.io import fits

from modules.scripts._commands import prog

SCRIPT = "compare_outputs"  # the installed command is comap-<SCRIPT with dashes>

#: Attributes, header keywords and JSON keys that record when, how or by which code a file was made.
PROVENANCE_KEYS = frozenset(
    {
        "comap_reduce_version",
        "config_sha256",
        "config_toml",
        "created_utc",
        "updated_utc",
        "written_utc",
        "registered_utc",
        "db_ops_json",
        "parameters_json",
        "parameters_sha256",
        "level1_mtime_utc",
        "level1_path",
        "level2_path",
        "DATE",
        "CODEVER",
        "CONFHASH",
        "CHECKSUM",
        "DATASUM",
        "created",
        "generated_utc",
        "code_version",
        "snapshot_utc",
        "COMAP CONFIGSHA",
        "COMAP VERSION",
        "CONFIGSHA",
        "NOISE TIME",  # wall-clock seconds of the map-noise realisations
    }
)
POINTING_SUFFIXES = ("_ra", "_dec", "_az", "_el")
SUFFIXES = (".hd5", ".h5", ".hdf5", ".fits", ".json")


def _files(root: Path, skip: Sequence[str]) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.suffix in SUFFIXES and not any(rel.startswith(s) for s in skip):
            out[rel] = p
    return out


def _equal_arrays(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[bool, str]:
    if a.shape != b.shape:
        return False, f"shape {a.shape} != {b.shape}"
    if a.dtype != b.dtype:
        return False, f"dtype {a.dtype} != {b.dtype}"
    if a.dtype.kind in "fc":
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        if not np.array_equal(nan_a, nan_b):
            return False, f"NaN pattern differs in {int(np.sum(nan_a != nan_b))} elements"
        diff = np.abs(a[~nan_a].astype(np.float64) - b[~nan_b].astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        if worst > atol:
            return False, f"max |difference| {worst:.3g} (tolerance {atol:.3g})"
        return True, ""
    if a.dtype.kind == "V" or a.dtype.names:
        return (a.tobytes() == b.tobytes()), "structured values differ"
    if not np.array_equal(a, b):
        return False, f"{int(np.sum(a != b))} elements differ"
    return True, ""


def _attr_diffs(where: str, a: Any, b: Any, ignore: frozenset[str]) -> Iterator[str]:
    keys = (set(a.keys()) | set(b.keys())) - ignore
    for k in sorted(keys):
        if k not in a or k not in b:
            yield f"{where}: attribute {k!r} only in {'candidate' if k in b else 'reference'}"
            continue
        if isinstance(a[k], str) and isinstance(b[k], str) and a[k][:1] in "{[":
            try:
                ja, jb = json.loads(a[k]), json.loads(b[k])
            except ValueError:
                pass
            else:
                yield from (f"{where}: attribute {k!r}{d}" for d in _json_diffs("", ja, jb, ignore))
                continue
        va, vb = np.asarray(a[k]), np.asarray(b[k])
        if va.shape != vb.shape or not (
            np.array_equal(va, vb, equal_nan=va.dtype.kind == "f" and vb.dtype.kind == "f")
        ):
            yield f"{where}: attribute {k!r}: {a[k]!r} != {b[k]!r}"


def compare_hdf5(ref: Path, cand: Path, atol_deg: float, ignore: frozenset[str]) -> list[str]:
    """Differences between two HDF5 files, one line each."""
    out: list[str] = []
    with h5py.File(ref, "r") as fa, h5py.File(cand, "r") as fb:
        names_a: dict[str, Any] = {}
        names_b: dict[str, Any] = {}
        fa.visititems(lambda n, o: names_a.__setitem__(n, o))
        fb.visititems(lambda n, o: names_b.__setitem__(n, o))
        for n in sorted(set(names_a) ^ set(names_b)):
            out.append(f"{n}: only in {'candidate' if n in names_b else 'reference'}")
        out.extend(_attr_diffs("/", fa.attrs, fb.attrs, ignore))
        for n in sorted(set(names_a) & set(names_b)):
            oa, ob = names_a[n], names_b[n]
            out.extend(_attr_diffs(n, oa.attrs, ob.attrs, ignore))
            if isinstance(oa, h5py.Dataset) != isinstance(ob, h5py.Dataset):
                out.append(f"{n}: group in one file, dataset in the other")
                continue
            if isinstance(oa, h5py.Dataset):
                tol = atol_deg if n.endswith(POINTING_SUFFIXES) else 0.0
                ok, why = _equal_arrays(oa[()] if oa.shape else np.asarray(oa[()]), ob[()], tol)
                if not ok:
                    out.append(f"{n}: {why}")
    return out


def compare_fits(ref: Path, cand: Path, ignore: frozenset[str]) -> list[str]:
    """Differences between two FITS files, HDU by HDU."""
    out: list[str] = []
    with fits.open(ref) as ha, fits.open(cand) as hb:
        if len(ha) != len(hb):
            return [f"{len(ha)} HDUs != {len(hb)}"]
        for i, (a, b) in enumerate(zip(ha, hb, strict=True)):
            label = f"HDU {i} ({a.name})"
            ka = {k for k in a.header if k and k not in ("HISTORY", "COMMENT")}
            kb = {k for k in b.header if k and k not in ("HISTORY", "COMMENT")}
            for k in sorted((ka ^ kb) - ignore):
                out.append(f"{label}: keyword {k} only in {'candidate' if k in kb else 'reference'}")
            for k in sorted((ka & kb) - ignore):
                if a.header[k] != b.header[k]:
                    out.append(f"{label}: {k} = {a.header[k]!r} != {b.header[k]!r}")
            if (a.data is None) != (b.data is None):
                out.append(f"{label}: data in one file only")
            elif a.data is not None:
                ok, why = _equal_arrays(np.asarray(a.data), np.asarray(b.data), 0.0)
                if not ok:
                    out.append(f"{label}: {why}")
    return out


def _json_diffs(where: str, a: Any, b: Any, ignore: frozenset[str]) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted((set(a) | set(b)) - ignore):
            if k not in a or k not in b:
                yield f"{where}.{k}: only in {'candidate' if k in b else 'reference'}"
            else:
                yield from _json_diffs(f"{where}.{k}", a[k], b[k], ignore)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _json_diffs(f"{where}[{i}]", x, y, ignore)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        yield f"{where}: {a!r} != {b!r}"


def compare_trees(
    reference: Path, candidate: Path, *, atol_arcsec: float = 0.0, ignore: Sequence[str] = (), skip=()
) -> dict[str, list[str]]:
    """Map of relative path → list of differences (empty lists omitted)."""
    keys = PROVENANCE_KEYS | frozenset(ignore)
    fa, fb = _files(reference, skip), _files(candidate, skip)
    report: dict[str, list[str]] = {}
    for rel in sorted(set(fa) ^ set(fb)):
        report[rel] = [f"only in {'candidate' if rel in fb else 'reference'}"]
    for rel in sorted(set(fa) & set(fb)):
        a, b = fa[rel], fb[rel]
        if a.suffix == ".fits":
            diffs = compare_fits(a, b, keys)
        elif a.suffix == ".json":
            diffs = list(_json_diffs("", json.loads(a.read_text()), json.loads(b.read_text()), keys))
        else:
            diffs = compare_hdf5(a, b, atol_arcsec / 3600.0, keys)
        if diffs:
            report[rel] = diffs
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog(SCRIPT), description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--atol-arcsec", type=float, default=0.0, help="tolerance on pointing datasets")
    p.add_argument("--ignore-attr", action="append", default=[], help="also ignore this attribute/key")
    p.add_argument(
        "--skip", action="append", default=["remote/", "level1/"], help="relative path prefix to skip"
    )
    args = p.parse_args(argv)
    for d in (args.reference, args.candidate):
        if not d.is_dir():
            print(f"{prog(SCRIPT)}: {d} is not a directory", file=sys.stderr)
            return 2
    report = compare_trees(
        args.reference, args.candidate, atol_arcsec=args.atol_arcsec, ignore=args.ignore_attr, skip=args.skip
    )
    n = len(_files(args.reference, args.skip))
    for rel, diffs in report.items():
        print(rel)
        for d in diffs[:20]:
            print(f"    {d}")
        if len(diffs) > 20:
            print(f"    … {len(diffs) - 20} more")
    print(f"{n} reference files, {len(report)} differ")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main())
