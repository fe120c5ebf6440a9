#!/usr/bin/env python
"""comap-reduce entry point: ``python run.py parameter_files/main_run.toml`` (see ``--help``)."""

import sys

from modules.pipeline_control.cli import main

if __name__ == "__main__":
    sys.exit(main())
