from modules.MapMaking.MapMakingModules.CreateMapPerFeed.CreateMapPerFeed import CreateMapPerFeed

__all__ = ["CreateMapPerFeed"]
