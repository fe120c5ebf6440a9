from modules.ProcessLevel2.CalibrationModel.CalibrationModel import CalibrationModel

__all__ = ["CalibrationModel"]
