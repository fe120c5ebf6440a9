"""Level-2 processing: Level2Pipeline and its per-observation modules; see docs/level2.md."""
