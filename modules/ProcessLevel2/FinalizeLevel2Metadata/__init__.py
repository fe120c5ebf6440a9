from modules.ProcessLevel2.FinalizeLevel2Metadata.FinalizeLevel2Metadata import FinalizeLevel2Metadata

__all__ = ["FinalizeLevel2Metadata"]
