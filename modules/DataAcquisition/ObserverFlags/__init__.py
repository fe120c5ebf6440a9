"""ObserverFlags stage package.

The class is re-exported lazily (on first attribute access), so that
``python -m modules.DataAcquisition.ObserverFlags.ObserverFlags CSV`` runs its module as ``__main__``
without Python's "found in sys.modules" RuntimeWarning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from modules.DataAcquisition.ObserverFlags.ObserverFlags import ObserverFlags

__all__ = ["ObserverFlags"]


def __getattr__(name: str) -> Any:
    if name == "ObserverFlags":
        from modules.DataAcquisition.ObserverFlags.ObserverFlags import ObserverFlags as cls

        globals()["ObserverFlags"] = cls  # replaces the submodule bound by the import system
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
