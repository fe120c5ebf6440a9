"""Level-1 simulator (docs/simulator.md): writes level-1 files in the exact level-1 format with the truth in
``/truth``.

Python API::

    from utils.simulator import simulate_observation, make_archive, ObservationSpec, ArchiveSpec, PRESETS
    paths = make_archive("test-tiny", "/tmp/tiny", seed=1)

Command line: ``python -m utils.simulator {archive,observation,report} ...`` (see ``__main__``).

The simulator imports only numpy, scipy, h5py, astropy and ``utils``; it never imports ``modules``.
"""

from .archive import make_archive, read_index
from .component_spec import NaNBurst, SkyComponent
from .presets import PRESETS
from .spec import ArchiveSpec, HIIRegion, ObservationSpec, ScanSpec, SkySpec
from .variety import scaled_sky, sky_free_twin
from .writer import SIMULATOR_VERSION, simulate_observation

__all__ = [
    "PRESETS",
    "SIMULATOR_VERSION",
    "ArchiveSpec",
    "HIIRegion",
    "NaNBurst",
    "ObservationSpec",
    "ScanSpec",
    "SkyComponent",
    "SkySpec",
    "make_archive",
    "read_index",
    "simulate_observation",
    "scaled_sky",
    "sky_free_twin",
]
