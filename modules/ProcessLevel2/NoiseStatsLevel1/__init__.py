from modules.ProcessLevel2.NoiseStatsLevel1.NoiseStatsLevel1 import NoiseStatsLevel1

__all__ = ["NoiseStatsLevel1"]
