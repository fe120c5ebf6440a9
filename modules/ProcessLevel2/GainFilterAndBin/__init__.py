from modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin import GainFilterAndBin

__all__ = ["GainFilterAndBin"]
