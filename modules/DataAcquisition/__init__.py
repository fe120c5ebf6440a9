"""Data acquisition: remote listing, rsync download, registration and observer flags (spec 06)."""
