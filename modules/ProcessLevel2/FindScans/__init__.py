from modules.ProcessLevel2.FindScans.FindScans import FindScans

__all__ = ["FindScans"]
