"""Level-2 processing: Level2Pipeline and its per-observation modules (spec 03)."""
