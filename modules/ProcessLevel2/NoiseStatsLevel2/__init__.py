from modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2 import NoiseStatsLevel2

__all__ = ["NoiseStatsLevel2"]
