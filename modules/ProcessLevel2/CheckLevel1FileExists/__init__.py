from modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists import CheckLevel1FileExists

__all__ = ["CheckLevel1FileExists"]
