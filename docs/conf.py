"""Sphinx configuration of the comap-reduce documentation (``make docs``).

Pages are MyST Markdown; the module reference and the file-format tables are generated from the
code by ``_ext/comap_docs.py``. No intersphinx: the build needs no network.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the project, for the generated tables and autodoc
sys.path.insert(0, str(DOCS / "_ext"))

project = "comap-reduce"
author = "the COMAP collaboration"
copyright = "the COMAP collaboration"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "numpydoc",
    "comap_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]

# Code comments link to docs/<page>.md#<anchor>: every heading down to level 4 gets a slug.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"

html_theme = "alabaster"
html_title = "comap-reduce"
html_static_path = []
