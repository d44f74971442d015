"""The public surface: every public name importable from the package, no module shadowed by a
function, numpydoc sections on every public function, cross-references that lead somewhere."""

import importlib
import inspect
import pathlib
import pkgutil
import re
import warnings

import pytest

import fastsgdstab
from fastsgdstab import theory

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIFICATION = ROOT / "docs" / "specification.md"


def public_functions():
    for name in fastsgdstab.__all__:
        obj = getattr(fastsgdstab, name)
        if inspect.isfunction(obj):
            yield f"fastsgdstab.{name}", obj
    for name in theory.__all__:
        obj = getattr(theory, name)
        if inspect.isfunction(obj):
            yield f"fastsgdstab.theory.{name}", obj


def test_every_name_in_all_imports_from_the_package():
    for name in fastsgdstab.__all__:
        assert hasattr(fastsgdstab, name), name
    namespace = {}
    exec("from fastsgdstab import *", namespace)
    assert set(fastsgdstab.__all__) <= set(namespace)


OPTIONAL_MODULES = {"fastsgdstab.torch", "fastsgdstab.jax"}


def test_every_api_page_entry_imports():
    text = (ROOT / "docs" / "api.md").read_text()
    for path in re.findall(r"^::: (\S+)$", text, re.M):
        module, _, name = path.rpartition(".")
        try:
            target = importlib.import_module(path)
        except ImportError:
            target = getattr(importlib.import_module(module), name)
        assert target is not None, path
        # Optional adapters (fastsgdstab.torch) are modules the package never imports itself.
        if module == "fastsgdstab" and path not in OPTIONAL_MODULES:
            assert name in fastsgdstab.__all__, f"{path} is in docs/api.md but not in __all__"


def test_no_module_is_shadowed_by_a_function():
    for info in pkgutil.iter_modules(fastsgdstab.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fastsgdstab.{info.name}")
        attribute = getattr(fastsgdstab, info.name, module)
        assert attribute is module, (
            f"fastsgdstab.{info.name} is {attribute!r}, hiding the module of the same name")


def test_exceptions_and_warnings_are_exported():
    for name in ["CertificationWarning", "CertificationError", "ConvergenceError"]:
        assert issubclass(getattr(fastsgdstab, name), Exception)


def test_typed_marker_is_shipped():
    assert (pathlib.Path(fastsgdstab.__file__).parent / "py.typed").exists()


@pytest.mark.parametrize("name, function", list(public_functions()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_functions_have_numpydoc_sections(name, function):
    doc = inspect.getdoc(function) or ""
    for section in ("Parameters", "Returns", "Raises", "Examples"):
        assert re.search(rf"^{section}\n-{{3,}}$", doc, re.M), f"{name}: no {section} section"


def _headings(path):
    names = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^#+\s+(?:\d+\.\s+)?(.*?)\s*(?:\*\(.*\)\*)?\s*$", line)
        if match:
            names.add(match.group(1).strip())
    return names


def test_section_references_point_to_existing_sections():
    """Docstrings and pages cite the specification page's sections by name: each must exist."""
    headings = _headings(SPECIFICATION)
    for page in (ROOT / "docs").rglob("*.md"):  # a page may cite one of its own sections
        headings |= _headings(page)
    sources = list((ROOT / "fastsgdstab").rglob("*.py")) + list((ROOT / "docs").rglob("*.md"))
    missing = []
    for path in sources:
        text = " ".join(path.read_text().split())  # references may wrap across lines
        for match in re.finditer(r'sections? ((?:"[^"]+"(?:,| and| or)? ?)+)', text):
            for title in re.findall(r'"([^"]+)"', match.group(1)):
                if not any(heading == title or heading.startswith(title + " (") for heading in headings):
                    missing.append(f"{path.relative_to(ROOT)}: {title!r}")
    assert not missing, "sections cited but not on the specification page:\n" + "\n".join(missing)


def test_results_print_a_short_summary():
    family = fastsgdstab.HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]])
    grid = fastsgdstab.stability_map(family, list(range(1, 61)), [1, 2, 3, 4])
    text = str(grid)
    assert len(text) < 1000 and "indexed [batch size, lr]" in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastsgdstab.SimulationWarning)  # heavy tail: expected
        result = fastsgdstab.simulate(family, 0.3, 2, 2000, 500, progress=False)
    text = str(result)
    assert len(text) < 1000 and "Lyapunov exponent" in text and "95% interval [0, " in text


def test_import_fastsgdstab_imports_no_optional_package():
    """``import fastsgdstab`` (and its submodules that are not adapters) imports none of the
    optional packages nor the adapter modules (fastsgdstab.torch, .lightning, .transformers,
    .jax), whose own names do not shadow them."""
    import subprocess
    import sys

    code = ("import sys, fastsgdstab, fastsgdstab.family, fastsgdstab.estimation\n"
            "optional = ('torch', 'lightning', 'pytorch_lightning', 'transformers', 'accelerate', "
            "'jax', 'jaxlib', 'flax', 'dask', 'distributed', 'pandas', 'matplotlib', "
            "'fastsgdstab.torch', 'fastsgdstab.lightning', 'fastsgdstab.transformers', "
            "'fastsgdstab.jax')\n"
            "loaded = [m for m in sys.modules if m in optional or m.split('.')[0] in optional]\n"
            "assert not loaded, f'import fastsgdstab imported {loaded}'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
