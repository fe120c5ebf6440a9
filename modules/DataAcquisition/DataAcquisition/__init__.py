from modules.DataAcquisition.DataAcquisition.DataAcquisition import DataAcquisition

__all__ = ["DataAcquisition"]
