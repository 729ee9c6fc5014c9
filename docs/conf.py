"""Sphinx configuration of the maxup-jax documentation.

Build it from the repository root (tutorials executed, warnings as errors):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# The library from this checkout, also when it is not installed.
sys.path.insert(0, ROOT)

import maxup_jax  # noqa: E402

project = "maxup-jax"
author = "The maxup-jax authors"
copyright = "2026, The maxup-jax authors"
release = maxup_jax.__version__
version = release

extensions = [
    "myst_nb",  # Markdown pages and executed notebooks (includes myst_parser).
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style Args/Returns/Raises sections.
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "README.md", ".gitignore"]
root_doc = "index"

# The docstrings write code in single backticks, as Markdown does.
default_role = "code"

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autosummary_generate = False
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 4
# RESULTS.md and BENCHMARKS.md, included as pages, are written for GitHub, where a
# heading may skip a level.
suppress_warnings = ["myst.header"]

# Tutorials run on every build, on CPU; a failing cell fails the build.
nb_execution_mode = os.environ.get("MAXUP_JAX_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

intersphinx_mapping = {}  # No network at build time: links to other projects are plain URLs.

html_theme = "sphinx_book_theme"
html_title = f"maxup-jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = []


def _flax_module_signature(app, what, name, obj, options, signature, return_annotation):
  """Shows a Flax module's own fields: no `parent` and `name`, dtypes by name."""
  import inspect

  import flax.linen as nn

  if what != "class" or not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
    return None
  fields = []
  for parameter in inspect.signature(obj).parameters.values():
    if parameter.name in ("parent", "name"):
      continue
    text = parameter.name
    if parameter.default is not inspect.Parameter.empty:
      default = parameter.default
      shown = (f"jnp.{default.__name__}" if isinstance(default, type)
               and default.__module__.startswith(("jax", "numpy")) else repr(default))
      text += f"={shown}"
    fields.append(text)
  return f"({', '.join(fields)})", return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _flax_module_signature)
