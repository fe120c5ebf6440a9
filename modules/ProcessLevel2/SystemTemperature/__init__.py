from modules.ProcessLevel2.SystemTemperature.SystemTemperature import SystemTemperature

__all__ = ["SystemTemperature"]
