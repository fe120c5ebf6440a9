from modules.DataAcquisition.DataCheckRemote.DataCheckRemote import DataCheckRemote

__all__ = ["DataCheckRemote"]
