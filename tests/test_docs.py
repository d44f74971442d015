"""The documentation site builds without warnings (mkdocs --strict), with every page in the nav.

The doctests inside docs/*.md run separately (pytest's --doctest-glob=*.md over docs/).
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def nav_pages(nav):
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from nav_pages(value)
        else:
            yield value


def test_every_page_is_in_the_nav():
    import yaml  # installed with mkdocs

    with open(ROOT / "mkdocs.yml") as handle:
        config = yaml.safe_load(handle)
    pages = set(nav_pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == on_disk
    for required in ["exact.md", "theory.md", "simulation.md", "api.md", "getting-started.md"]:
        assert required in pages


def test_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "WARNING" not in output, output
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # mkdocstrings rendered the docstrings, not just the headings.
    for text in ["stability_map", "Exact critical learning rate", "Theorem 1 of Dexter", "parse_grid"]:
        assert text in api
    assert (tmp_path / "site" / "images" / "figure1_lr0.5_bernoulli.png").stat().st_size > 10_000
