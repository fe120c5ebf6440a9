from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning

__all__ = ["PostBinCleaning"]
