from modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap import CreateLineMap

__all__ = ["CreateLineMap"]
