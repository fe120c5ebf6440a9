"""The parameters and the remote selection shared by DataCheckRemote and DataAcquisition
(docs/acquisition.md).

Deliberately without ``from __future__ import annotations``: the dataclass fields keep their
annotation objects, so that the config loader reads them through a subclass defined in another
module (``typing.get_type_hints`` evaluates string annotations in the subclass's module).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from modules.DataAcquisition.filters import (
    FilterSettings,
    Selection,
    remote_parameter_rules,
    select_remote_files,
)
from modules.DataAcquisition.rsync import DEFAULT_SSH_COMMAND, Remote
from modules.pipeline_control.parameters import Range

__all__ = ["RemoteSelectionParameters"]


@dataclass(eq=False, repr=False)
class RemoteSelectionParameters:
    """Mixin of the stages that list the remote archive and select files with the filters of
    docs/acquisition.md#filters.

    Put it before :class:`~modules.pipeline_control.Pipeline.PipelineStage` in the bases of a
    dataclass: the stage's own parameters follow these in the generated ``__init__``, and
    :meth:`_select` uses the stage's ``context`` and ``logger``.

    Parameters
    ----------
    remote : str
        Local directory (``demo/remote/``), ``[user@]host:path`` (ssh) or
        ``rsync://host[:port]/module[/path]`` (docs/acquisition.md#remote-specification).
    local_dir : str
        Download directory; remote relative paths are mirrored under it (also used for the
        "already present" check).
    ssh_command : str
        Passed to rsync as the single ``-e`` argument for ssh remotes.
    remote_index : str or None
        Relative path of an index CSV on the remote (e.g. ``obs_index.csv``); needed by the source
        filters (``include_sources`` ... ``exclude_source_groups``), which without it are not
        applied (one warning).
    min_obsid_download : int
        Files of lower obsids are not selected (inclusive bound).
    max_obsid_download : int or None
        Files of higher obsids are not selected (inclusive bound); None = no upper limit.
    skip_registered : bool
        Skip files whose registered level-1 copy exists with the listed size.
    include_sources : list or None
        Glob patterns (case-insensitive) of source names: only observations of a matching source
        are selected; observations missing from ``remote_index`` are then rejected.
    exclude_sources : list or None
        Glob patterns (case-insensitive) of source names whose observations are not selected.
    include_source_groups : list or None
        Glob patterns (case-insensitive) of source groups: only observations of a matching group
        are selected; observations missing from ``remote_index`` are then rejected.
    exclude_source_groups : list or None
        Glob patterns (case-insensitive) of source groups whose observations are not selected;
        ``['CO']`` by default, which leaves out the CO fields.
    listing_timeout_s : float
        Subprocess timeout of the listing, s.
    """

    announces_local_dir: ClassVar[bool] = False
    """Whether this stage creates ``local_dir`` (a later DataAssess then accepts it before it exists)."""

    remote: str
    local_dir: str
    ssh_command: str = DEFAULT_SSH_COMMAND
    remote_index: str | None = None
    min_obsid_download: Annotated[int, Range(ge=0)] = 0
    max_obsid_download: int | None = None
    skip_registered: bool = True
    include_sources: list[str] | tuple[str, ...] | None = None
    exclude_sources: list[str] | tuple[str, ...] | None = None
    include_source_groups: list[str] | tuple[str, ...] | None = None
    exclude_source_groups: list[str] | tuple[str, ...] | None = ("CO",)
    listing_timeout_s: Annotated[float, Range(gt=0)] = 600.0

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        """The remote and filter rules of :func:`~modules.DataAcquisition.filters.remote_parameter_rules`;
        a stage adds its own after ``super().parameter_rules(params)``."""
        return [
            *super().parameter_rules(params),
            *remote_parameter_rules(params, announces_local_dir=cls.announces_local_dir),
        ]

    def _select(self, remote: Remote, rsync: str | None) -> Selection:
        """List ``remote`` (with ``rsync``, or in Python when None) and apply the filters."""
        return select_remote_files(
            remote,
            FilterSettings.from_object(self),
            rsync=rsync,
            ssh_command=self.ssh_command,
            remote_index=self.remote_index,
            listing_timeout_s=self.listing_timeout_s,
            local_dir=self.local_dir,
            cli_obsids=self.context.obsids,
            logger=self.logger,
        )
