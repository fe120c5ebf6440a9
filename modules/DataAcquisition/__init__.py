"""Data acquisition: remote listing, rsync download, registration and observer flags; see
docs/acquisition.md."""
