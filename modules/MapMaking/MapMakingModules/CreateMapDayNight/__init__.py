from modules.MapMaking.MapMakingModules.CreateMapDayNight.CreateMapDayNight import CreateMapDayNight

__all__ = ["CreateMapDayNight"]
