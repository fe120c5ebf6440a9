"""What a map product is, as the dispatcher sees it (docs/mapmaking.md#orchestration).

A product (continuum map, line cube, hit map, ...) is a map job class deriving from
:class:`MapProduct` and some of the parameter groups of :mod:`modules.MapMaking.job_parameters`.
It owns its steps:

1. :meth:`MapProduct.expand` turns the job and the selected observations into concrete outputs
   (objects with an ``output_path``, optional ``obsids`` restricting the observations, and for
   two-way splits ``suffix`` and ``pair``);
2. :meth:`MapProduct.make` reads the accepted segments file by file through a picklable,
   module-level read task (run serially or on the dispatcher's worker pool), assembles the
   partial results on a geometry and writes the file.

The dispatcher (:mod:`modules.MapMaking.dispatch`) does everything else: selection, the
skip-if-up-to-date check by :meth:`MapProduct.job_config_hash`, the pool, failure recording and
difference maps. It never imports a product.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from modules.MapMaking.dispatch import Dispatcher, JobInputs
from modules.MapMaking.job_parameters import group_rules
from modules.pipeline_control.Pipeline import MapJob
from modules.pipeline_control.provenance import sha256_of


def feed_label(feeds: list[int]) -> str:
    """Compress a feed list into ranges: ``feed01to19``, ``feed01to03_07``, ``feed05``."""
    feeds = sorted({int(f) for f in feeds})
    if not feeds:
        return "feednone"
    parts = []
    start = prev = feeds[0]
    for f in feeds[1:] + [None]:
        if f is not None and f == prev + 1:
            prev = f
            continue
        parts.append(f"{start:02d}" if start == prev else f"{start:02d}to{prev:02d}")
        if f is not None:
            start = prev = f
    return "feed" + "_".join(parts)


class MapProduct(MapJob):
    """Base of the map products: the protocol the dispatcher drives.

    ``product`` names what the job makes (``'map'``, ``'cube'``); a stage runs the jobs whose
    ``product`` is its own and rejects the others when the config is loaded.

    Under MPI (docs/mapmaking.md#distributed-map-making) a product whose ``distributed`` is True has its
    ``make`` called on every rank with ``world=``; the others run on rank 0 and their file reads go
    through ``executor``, a dynamic queue over the ranks.
    """

    product: ClassVar[str] = "map"
    distributed: ClassVar[bool] = False
    __abstract_module__ = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # only this base is abstract: every product below it is listed
        cls.__abstract_module__ = vars(cls).get("__abstract_module__", False)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        """The rules of the product's parameter groups; a product adds its own and calls
        ``super().parameter_rules(params)``."""
        return [*super().parameter_rules(params), *group_rules(cls, params)]

    def expand(self, observations: list[Any], selection_feeds: list[int]) -> list[Any]:
        """The concrete outputs of this job for the selected observations and their feeds."""
        raise NotImplementedError

    def output_identity(self, output: Any) -> dict[str, Any]:
        """What distinguishes ``output`` among the job's outputs, for its configuration hash."""
        raise NotImplementedError

    def make(self, output: Any, inputs: JobInputs, config_sha: str, executor=None) -> Path:
        """Read, assemble and write one output; ``executor`` (``map_unordered``) reads files in
        parallel. Raises ``dispatch.MapJobFailed`` when there is nothing to make it from."""
        raise NotImplementedError

    def job_config_hash(self, output: Any, observations: list[Any], updated: dict[int, str]) -> str:
        """Hash of the resolved parameters, the output's identity, the sorted obsids it takes and
        each level-2 file's ``updated_utc`` (docs/mapmaking.md#orchestration step 2): a new or reprocessed
        observation remakes the output. A product whose ``algorithm_version`` is above 1 adds it, so
        that raising it remakes the outputs while version 1 keeps the hashes of older files
        (docs/operations.md#algorithm-versions)."""
        only = getattr(output, "obsids", None)
        ids = sorted(o.obsid for o in observations if only is None or o.obsid in only)
        version = int(type(self).algorithm_version)
        return sha256_of(
            {
                "params": self.parameters,
                **self.output_identity(output),
                "obsids": ids,
                "level2_updated_utc": [updated.get(i, "") for i in ids],
                **({"algorithm_version": version} if version != 1 else {}),
            }
        )

    def settings(self, settings_cls: type, **given: Any):
        """An instance of the reader-settings dataclass ``settings_cls``: the fields in ``given``,
        the others from this job's parameters of the same name."""
        values = {f.name: getattr(self, f.name) for f in fields(settings_cls) if f.name not in given}
        return settings_cls(**values, **given)

    def run(self, files: list[Any]) -> Any:
        """Make every output of this job from ``files`` (COMAPData rows): used standalone; inside a
        run the stage drives the jobs (selection, skip checks, parallel reading)."""
        return Dispatcher(type(self).__name__, self.product).run_job(self, files)


__all__ = ["MapProduct", "feed_label"]
