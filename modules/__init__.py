"""Pipeline stages of comap-reduce, addressed from TOML call strings (``modules.<Package>...``)."""
