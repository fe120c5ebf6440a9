from modules.MapMaking.MapMakingModules.CreateHitMap.CreateHitMap import CreateHitMap

__all__ = ["CreateHitMap"]
