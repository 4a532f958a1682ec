"""Sphinx configuration: the API reference, built from wva_jax's docstrings.

Build (warnings are errors, as in CI): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "wva-jax"
author = "wva-jax authors"
copyright = "wva-jax authors, Apache-2.0"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# The docstrings are Google style (Args / Returns / Example / References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A NamedTuple state's "Attributes:" as a field list of the class: attribute
# directives would duplicate the fields autodoc finds on the tuple.
napoleon_use_ivar = True

# Signatures keep the source's order; type hints go into the parameter list,
# not the signature line, so long optax types stay readable.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False

html_theme = "furo"
html_title = "wva-jax"
exclude_patterns = ["_build"]
