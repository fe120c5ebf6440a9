from modules.ProcessLevel2.CalibratorFitting.CalibratorFitting import CalibratorFitting

__all__ = ["CalibratorFitting"]
