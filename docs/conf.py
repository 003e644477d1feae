"""Sphinx configuration: the API reference generated from the docstrings (autodoc + napoleon).

Build (CI does, warnings as errors): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import divebatch_jax

project = "divebatch_jax"
author = "The divebatch_jax authors"
copyright = "The divebatch_jax authors, Apache-2.0"  # pylint: disable=redefined-builtin
release = divebatch_jax.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "*.md"]  # the guides are Markdown, read on GitHub; linked from index
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
napoleon_use_ivar = True  # a NamedTuple's "Attributes:" as fields, not a second description of each


def _escape_bars(text: str) -> str:
  """``|`` escaped outside inline literals (````...````), where reST reads ``|x|`` as a substitution."""
  parts = text.split("``")
  return "``".join(p if i % 2 else p.replace("|", r"\|") for i, p in enumerate(parts))


def _plain_text_bars(app, what, name, obj, options, lines):
  """The docstrings write norms and sizes as plain text (``|B|``); bars outside literals and
  literal blocks (after ``::``) are escaped."""
  del app, what, name, obj, options
  block_indent = None  # the indentation of the paragraph that opened a literal block
  for i, line in enumerate(lines):
    indent = len(line) - len(line.lstrip())
    if block_indent is not None and (not line.strip() or indent > block_indent):
      continue
    block_indent = None
    lines[i] = _escape_bars(line)
    if line.rstrip().endswith("::"):
      block_indent = indent


def setup(app):
  app.connect("autodoc-process-docstring", _plain_text_bars)
