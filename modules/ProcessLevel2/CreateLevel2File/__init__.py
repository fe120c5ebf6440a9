from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File

__all__ = ["CreateLevel2File"]
