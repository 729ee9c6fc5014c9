"""The API reference under docs/api lists every public function and class.

Sphinx (run by .ci/run with warnings as errors) checks that what the pages
name exists and renders; this checks the converse, that nothing public is left
out of them.
"""

import importlib
import inspect
import re

import pytest

import maxup_jax
from conftest import REPO

API = REPO / "docs" / "api"

# page -> the modules it documents.
PAGES = {
    "maxup.rst": ("maxup_jax.maxup",),
    "augment.rst": ("maxup_jax.augment",),
    "losses.rst": ("maxup_jax.losses",),
    "models.rst": ("maxup_jax.models", "maxup_jax.models.awd_lstm"),
    "smoothing.rst": ("maxup_jax.smoothing",),
    "dynamic_eval.rst": ("maxup_jax.dynamic_eval",),
}


def _public_names(module_name: str) -> set[str]:
  module = importlib.import_module(module_name)
  if hasattr(module, "__all__"):
    return set(module.__all__)
  return {name for name, value in vars(module).items()
          if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
          and value.__module__ == module_name}


def _documented_names(page: str) -> set[str]:
  text = (API / page).read_text()
  return set(re.findall(r"^\.\. auto(?:function|class|data):: (\w+)", text, re.M))


@pytest.mark.parametrize("page", sorted(PAGES))
def test_api_page_documents_every_public_name(page):
  public = set().union(*(_public_names(module) for module in PAGES[page]))
  missing = public - _documented_names(page)
  assert not missing, f"docs/api/{page} does not document {sorted(missing)}"


def test_every_api_page_is_in_the_index():
  index = (API / "index.rst").read_text()
  assert {page.removesuffix(".rst") for page in PAGES} <= set(index.split())
  assert {path.name for path in API.glob("*.rst")} == set(PAGES) | {"index.rst"}


def test_package_exports_are_documented():
  documented = _documented_names("maxup.rst")
  functions_and_classes = {name for name in maxup_jax.__all__
                           if not inspect.ismodule(getattr(maxup_jax, name))}
  assert functions_and_classes <= documented
