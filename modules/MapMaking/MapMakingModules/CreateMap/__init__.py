from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap

__all__ = ["CreateMap"]
