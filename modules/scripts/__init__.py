"""Small command-line tools over the database (``python -m modules.scripts.<name> --help``)."""
