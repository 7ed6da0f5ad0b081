"""Sphinx configuration: MyST markdown pages and an API reference read from jxent's docstrings.

Built by ``make docs`` (warnings are errors); the pages' code blocks are run by the test suite
(tests/test_readme.py and pytest's doctest collection of docs/**/*.md).
"""

import re

import jxent

project = "jxent"
author = "The jxent authors"
copyright = "the jxent authors, Apache-2.0"
release = version = jxent.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ math in pages, ::: fences, and anchors for headings down to ### so that pages
# can link to each other's sections (e.g. benchmarks.md#per-backend-code-paths).
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# The docstrings are Google style (Args:, Returns:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = True
# Signatures as help() shows them, with the annotations' own spelling of ArrayLike.
autodoc_typehints = "signature"
autodoc_type_aliases = {"ArrayLike": "ArrayLike"}
autodoc_preserve_defaults = True
autosummary_generate = False

html_theme = "sphinx_book_theme"
html_title = f"jxent {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


def _show_aliases_as_written(app, what, name, obj, options, signature, return_annotation):
    """``autodoc_type_aliases`` keeps ``ArrayLike`` unexpanded but, inside a union, Sphinx 9
    prints it as ``TypeAliasForwardRef('ArrayLike')``; show it as the source and help() do."""

    def plain(text):
        return text and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", text)

    return plain(signature), plain(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _show_aliases_as_written)
