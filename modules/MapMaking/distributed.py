"""A map job over the ranks of an MPI run (docs/mapmaking.md#distributed-map-making).

Every rank runs the same job code (:meth:`CreateMap.make`) on its share of the level-2 files and holds
only its share of the TOD; map-sized quantities are combined across ranks (the destriper's ``Allreduce``).
:class:`Ranks` is the one object the job code talks to: with no communicator (a serial run) every
operation is the identity, so serial and MPI runs share one code path.

Rules that keep the ranks in step:

* what only rank 0 may do (the pre-pass, the geometry) runs in :meth:`Ranks.on_root`, whose value *or
  exception* every rank receives;
* what every rank does on its own share and may fail (reading files) runs in :meth:`Ranks.agree`: if it
  fails on any rank it fails on all, with the first rank's message, before anyone enters a collective;
* every decision that leads to a collective (drop the map, destripe again) is taken on values that are
  identical on every rank (:meth:`Ranks.any`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

T = TypeVar("T")


class Ranks:
    """The ranks a map job runs on: an mpi4py communicator, or None for one process.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm or None
        Passed to :func:`~modules.MapMaking.destriper.destripe`.
    rank, size : int
    """

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm if comm is not None and comm.Get_size() > 1 else None
        self.rank = int(comm.Get_rank()) if self.comm is not None else 0
        self.size = int(comm.Get_size()) if self.comm is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bcast(self, value: T) -> T:
        return value if self.comm is None else self.comm.bcast(value, root=0)

    def allgather(self, value: T) -> list[T]:
        return [value] if self.comm is None else self.comm.allgather(value)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order on rank 0; None elsewhere."""
        return [value] if self.comm is None else self.comm.gather(value, root=0)

    def any(self, flag: bool) -> bool:
        return bool(flag) if self.comm is None else any(self.comm.allgather(bool(flag)))

    def sum(self, value: float) -> float:
        return float(value) if self.comm is None else float(sum(self.comm.allgather(float(value))))

    def on_root(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; every rank returns its value or raises its exception."""
        if self.comm is None:
            return fn()
        outcome: tuple[bool, Any] | None = None
        if self.is_root:
            try:
                outcome = (True, fn())
            except Exception as exc:
                outcome = (False, exc)
        ok, value = self.comm.bcast(outcome, root=0)
        if not ok:
            raise value
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it raised on any, every rank raises the lowest failing rank's
        exception."""
        if self.comm is None:
            return fn()
        try:
            value, error = fn(), None
        except Exception as exc:
            value, error = None, exc
        errors = self.comm.allgather(error)
        for exc in errors:
            if exc is not None:
                raise exc
        return value


def share_of_files(plans: list[Any], ranks: Ranks) -> list[Any]:
    """This rank's segment plans: whole files, balanced by sample count (largest file first to the
    least-loaded rank), each rank's files kept in the selection's order. All plans for one rank."""
    if ranks.size == 1:
        return list(plans)
    order: list[str] = []
    samples: dict[str, int] = {}
    for p in plans:
        if p.path not in samples:
            order.append(p.path)
            samples[p.path] = 0
        samples[p.path] += int(p.n)
    load = [0] * ranks.size
    owner: dict[str, int] = {}
    for path in sorted(order, key=lambda f: (-samples[f], order.index(f))):
        r = int(np.argmin(load))
        owner[path] = r
        load[r] += samples[path]
    return [p for p in plans if owner[p.path] == ranks.rank]


def file_order(plans: list[Any]) -> list[Any]:
    """Plans grouped by file in order of first appearance: the order the reader concatenates them."""
    by_file: dict[str, list[Any]] = {}
    for p in plans:
        by_file.setdefault(p.path, []).append(p)
    return [p for segs in by_file.values() for p in segs]


def segment_ids(local_plans: list[Any], all_plans: list[Any]) -> NDArray[np.int64]:
    """Index of each local segment in the serial reader's order of ``all_plans`` (the noise seeds and
    the SEGNOISE rows use it, so that they do not depend on the number of ranks)."""
    index = {(p.obsid, p.feed, p.scan): k for k, p in enumerate(file_order(all_plans))}
    return np.array([index[(p.obsid, p.feed, p.scan)] for p in local_plans], dtype=np.int64)


def complete_output(out: Any, all_plans: list[Any], ranks: Ranks) -> Any:
    """The reader output of this rank with the metadata of the whole map (what the FITS header records):
    every observation, feed and segment, the weighted frequency, the mean pointing and the sample count
    over all ranks. The TOD arrays stay this rank's."""
    if ranks.size == 1:
        return out
    plans = file_order(all_plans)
    w_seg = np.array([p.n / (p.auto_rms_k / p.factor) ** 2 for p in plans])
    sums = np.sum(ranks.allgather(np.asarray(out.azelmjd_sums, dtype=np.float64)), axis=0)
    rates = [r for r in ranks.allgather(float(out.sample_rate_hz)) if np.isfinite(r)]
    mean = None
    if ranks.any(out.mean_azel_mjd is not None) and sums[3] > 0:
        mean = (sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3])
    counts: Counter = Counter()
    for c in ranks.allgather(dict(out.counts)):
        counts.update(c)
    mjds = [p.mjd_mid for p in plans]
    return replace(
        out,
        obsids=sorted({p.obsid for p in plans}),
        feeds=sorted({p.feed for p in plans}),
        mjd_range=(min(mjds), max(mjds)),
        freq_ghz=float(np.average([p.freq_ghz for p in plans], weights=w_seg)),
        bandwidth_ghz=float(np.nanmedian([p.bandwidth_ghz for p in plans])),
        n_segments=len(plans),
        mean_azel_mjd=mean,
        counts=counts,
        sample_rate_hz=float(np.median(rates)) if rates else float("nan"),
        n_samples_total=int(ranks.sum(out.tod.size)),
    )


def restrict_output(out: Any, kept_plans: list[Any], ranks: Ranks) -> Any:
    """After segments were dropped on every rank: the whole map's observations, feeds, time range,
    segment and sample counts from ``kept_plans`` (all ranks' kept segments)."""
    if ranks.size == 1:
        return out
    return replace(
        out,
        obsids=sorted({p.obsid for p in kept_plans}),
        feeds=sorted({p.feed for p in kept_plans}),
        mjd_range=(min(p.mjd_mid for p in kept_plans), max(p.mjd_mid for p in kept_plans)),
        n_segments=len(kept_plans),
        n_samples_total=int(ranks.sum(out.tod.size)),
    )


def compress_pixels_global(
    pixels: NDArray[np.integer], ranks: Ranks, *weights: NDArray[np.floating]
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """:func:`~modules.MapMaking.read_data.compress_pixels` over all ranks: the hit pixels of the whole
    map (identical on every rank) and this rank's compressed indices."""
    from modules.MapMaking.read_data import compress_pixels

    hit, comp = compress_pixels(pixels, *weights)
    if ranks.size == 1:
        return hit, comp
    union = np.unique(np.concatenate(ranks.allgather(hit)))
    used = comp >= 0
    comp[used] = np.searchsorted(union, hit[comp[used]]).astype(np.int32)
    return union, comp


def gather_rows(ids: NDArray[np.int64], rows: dict[str, NDArray], ranks: Ranks) -> dict[str, NDArray] | None:
    """Table rows of every rank on rank 0, sorted by segment id (None on other ranks)."""
    parts = ranks.gather((ids, rows))
    if parts is None:
        return None
    all_ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(all_ids, kind="stable")
    return {k: np.concatenate([p[1][k] for p in parts])[order] for k in rows}


def gather_plans(ids: NDArray[np.int64], plans: list[Any], ranks: Ranks) -> list[Any] | None:
    """Segment plans of every rank on rank 0, in segment-id order (None on other ranks)."""
    parts = ranks.gather((ids, plans))
    if parts is None:
        return None
    pairs = [(int(i), p) for ids_r, plans_r in parts for i, p in zip(ids_r, plans_r)]
    return [p for _i, p in sorted(pairs, key=lambda ip: ip[0])]


__all__ = [
    "Ranks",
    "complete_output",
    "compress_pixels_global",
    "file_order",
    "gather_plans",
    "gather_rows",
    "restrict_output",
    "segment_ids",
    "share_of_files",
]
