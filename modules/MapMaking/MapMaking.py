"""MapMaking and LineMapMaking: the top-level stages that run the map jobs of a config
(docs/mapmaking.md#orchestration).

Both are thin: the dispatcher (:mod:`modules.MapMaking.dispatch`) selects the observations, skips
outputs that are up to date, runs the products' reads on one worker pool and records failures;
each job class (``MapMakingModules/<Job>/<Job>.py``) makes its own outputs. A stage runs the jobs
whose ``product`` is its own: a job of another kind is a configuration error.
"""

from __future__ import annotations

from typing import Any

from modules.MapMaking.dispatch import Dispatcher, wrong_products
from modules.pipeline_control.config import ErrorCollector, LoadedConfig, load_config
from modules.pipeline_control.Pipeline import PipelineStage, StageResult


class MapMaking(PipelineStage):
    """Make the destriped continuum maps listed in a map-making config (docs/mapmaking.md).

    Parameters
    ----------
    config_file : str
        The map-making config: its ``[Master]`` (``sql_database``, ``obsid_list``, ``min_obsid``,
        ``max_obsid``, ``nprocess``) and ``pipeline`` of map jobs (``CreateMap``, ``CreateHitMap``...).
    """

    sub_config_kind = "map"
    product = "map"

    def __init__(self, config_file: str = "parameter_files/level2_mapmaking.toml") -> None:
        self.config_file = config_file

    @classmethod
    def validate_sub_config(cls, sub: LoadedConfig) -> list[Any]:
        """Every job of the config makes this stage's product."""
        return wrong_products(sub.entries, cls.__name__, cls.product)

    def _sub_config(self) -> LoadedConfig:
        sub = self.context.sub_config(self.config_file)
        if sub is not None:
            return sub
        errors = ErrorCollector()
        sub = load_config(self.config_file, "map", errors)
        if sub is not None:
            for problem in self.validate_sub_config(sub):
                errors.add(problem, sub.path, "pipeline")
        errors.raise_if_any()
        assert sub is not None
        return sub

    def _dispatcher(self) -> Dispatcher:
        return Dispatcher(type(self).__name__, self.product, self.context)

    def plan(self) -> list[str]:
        sub = self._sub_config()
        lines = [f"{type(self).__name__}: config {self.config_file}"]
        return lines + self._dispatcher().plan(sub.entries, sub.master)

    def run(self) -> StageResult:
        sub = self._sub_config()
        return self._dispatcher().run(sub.entries, sub.master)


class LineMapMaking(MapMaking):
    """Make the RRL cubes listed in a line-map config (docs/mapmaking.md#rrl-cubes); its jobs are
    ``CreateLineMap`` calls.

    Parameters
    ----------
    config_file : str
        The line-map config: ``[Master]`` as for MapMaking and a ``pipeline`` of ``CreateLineMap``
        calls.
    """

    product = "cube"

    def __init__(self, config_file: str = "parameter_files/level2_line_mapmaking.toml") -> None:
        super().__init__(config_file)


__all__ = ["LineMapMaking", "MapMaking"]
