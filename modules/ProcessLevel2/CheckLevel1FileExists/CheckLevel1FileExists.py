"""CheckLevel1FileExists: validate the level-1 file before anything reads it
(docs/level2.md#checklevel1fileexists)."""

from __future__ import annotations

import os
from typing import Any

from modules.pipeline_control.Pipeline import BaseCOMAPModule
from utils import level1_layout as L1


class CheckLevel1FileExists(BaseCOMAPModule):
    """Validate the observation's level-1 file against checks C1–C13 (docs/formats/level1.md#validity-checks).

    Writes nothing to level 2; records ``level1_size_bytes`` in the database. It runs whenever the
    observation has other work and never makes an observation count as not done
    (``runs_with_others``).

    Parameters
    ----------
    validate : bool
        Run the validation checklist (False only records the file size).
    probe_tod : bool
        Include C13, the read of single TOD elements that detects truncated files.
    plot : bool
        Accepted for uniformity with the other level-2 modules; this module draws no plots.
    plot_dir : str
        Accepted for uniformity with the other level-2 modules; no file is written there.
    """

    runs_with_others = True
    reads = (L1.COMAP_ATTRIBUTES, L1.TOD)
    writes = ()

    def __init__(
        self,
        validate: bool = True,
        probe_tod: bool = True,
        plot: bool = False,
        plot_dir: str = "outputs/CheckLevel1FileExists",
    ) -> None:
        self.validate = validate
        self.probe_tod = probe_tod
        self.plot = plot
        self.plot_dir = plot_dir

    def already_processed(self, file_info: Any, overwrite: bool = False) -> bool:
        """Always True: this check never makes an observation count as not done."""
        return True

    def run(self, file_info: Any) -> None:
        ctx = self.observation_context(file_info)
        l1 = ctx.l1
        if self.validate:
            l1.validate(probe_tod=self.probe_tod)
        else:
            l1.open()
        size = os.path.getsize(l1.path)
        ctx.db.upsert_observation({"obsid": ctx.obsid, "level1_size_bytes": int(size)})
