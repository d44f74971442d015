"""Regenerate (or check) the command outputs and measured figures quoted in the docs.

Every block the docs quote from a command's output sits between two markers,

    <!-- generated: NAME by docs/scripts/tutorial_outputs.py -->
    ...
    <!-- end generated: NAME -->

and is written by this script, so that it cannot drift from what the code prints:

    python docs/scripts/tutorial_outputs.py              # rewrite every fast block
    python docs/scripts/tutorial_outputs.py --slow       # also the map example and its figure
    python docs/scripts/tutorial_outputs.py --measure    # also the measured timings (minutes)
    python docs/scripts/tutorial_outputs.py --check      # exit 1 if a fast block differs

tests/test_first_hour.py runs ``--check`` (the map example under ``--runslow``). Timings
cannot be checked: the measured blocks state the date, the machine's cores and its load, and
``--check`` only checks that they are there. Run from the repository root.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKER = re.compile(r"(<!-- generated: (?P<name>[\w-]+) by docs/scripts/tutorial_outputs.py -->\n)"
                    r"(?P<body>.*?)"
                    r"(<!-- end generated: (?P=name) -->)", re.S)

# The map tutorial's example (docs/tutorials/map.md); its figure is docs/images/map_demo.png.
MAP_ARGS = ["--lrs", "0.02:2.2:40", "--batch-sizes", "1:512:20:log"]


def _run_cli(argv) -> str:
    """``fastsgdstab ARGV``'s standard output, in this process, without the timing lines."""
    from fastsgdstab.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()):
        code = main(list(argv), out=buffer)
    if code:
        raise RuntimeError(f"fastsgdstab {' '.join(argv)} exited with {code}")
    lines = [line for line in buffer.getvalue().splitlines()
             if not line.startswith(("(computed in", "wrote "))]
    return "\n".join(lines).rstrip() + "\n"


def _analyze_family(directory: pathlib.Path) -> pathlib.Path:
    """The analyze tutorial's family (its section 1), saved as family.npz."""
    import numpy as np

    import fastsgdstab as fs

    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 30)) / np.sqrt(np.arange(1, 31))
    path = directory / "family.npz"
    fs.HessianFamily.from_features(features).save(path)
    return path


def _fenced(text: str) -> str:
    return "```text\n" + text + "```\n"


def analyze_report(directory):
    path = _analyze_family(directory)
    text = _run_cli(["analyze", str(path), "--lr", "1.5", "--batch-size", "16"])
    return _fenced(text.replace(str(path), "family.npz"))


def analyze_without_replacement(directory):
    path = _analyze_family(directory)
    text = _run_cli(["analyze", str(path), "--lr", "1.5", "--batch-size", "16",
                     "--sampling", "without_replacement"])
    # The header and the exact block: what the tutorial compares.
    lines = text.splitlines()
    return _fenced("\n".join(lines[:lines.index("Geometry (exact)")]).rstrip() + "\n")


def demo_report(directory):
    """The demo tutorial's block: the report's header, exact and geometry blocks."""
    lines = _run_cli(["demo"]).splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("Rayleigh bounds"))
    return _fenced("\n".join(lines[:cut]).rstrip() + "\n")


def map_demo(directory):
    """The map tutorial's example: its output (timing masked by --check) and its figure."""
    from fastsgdstab.cli import demo_family

    path = directory / "demo.npz"
    demo_family().save(path)
    image = ROOT / "docs" / "images" / "map_demo.png"
    argv = ["map", str(path), *MAP_ARGS, "--no-progress"]
    if not CHECKING:
        argv += ["--out", str(image), "--force"]
    text = _run_cli(argv)
    text = text.replace(str(path), "demo.npz")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("(no image"))
    return _fenced(text + "\n")


_OUTPUTS = {}


def _measured(command, label: str) -> str:
    """Run ``command`` (a list) once and say how long it took, where and under what load (its
    standard output is kept in ``_OUTPUTS``)."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    before = os.times()
    workdir = tempfile.mkdtemp()
    completed = subprocess.run(command, check=True, cwd=workdir, capture_output=True, text=True)
    if command == REPRODUCE:  # the docs' figure 1 panels come from this run
        import shutil

        for name in FIGURE1_IMAGES:
            shutil.copyfile(os.path.join(workdir, "figure1", name), ROOT / "docs" / "images" / name)
    wall = time.perf_counter() - started
    after = os.times()
    _OUTPUTS[tuple(command)] = completed.stdout
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    today = datetime.date.today().isoformat()
    return (f"{label}: {wall:.0f} s wall, {cpu:.0f} s CPU, measured on {today} on a "
            f"{os.cpu_count()}-core machine at load average {load:.1f} (by "
            f"docs/scripts/tutorial_outputs.py --measure; a quiet machine is faster)\n")


FIGURE1_IMAGES = ["figure1_lr0.5_bernoulli.png", "figure1_lr0.8_without_replacement.png"]
REPRODUCE = [sys.executable, "-m", "fastsgdstab", "reproduce", "figure1", "--out", "figure1",
             "--no-progress"]


def reproduce_timing(directory):
    return ("* " + _measured(REPRODUCE, "`fastsgdstab reproduce figure1` (the full run, with its "
                                        "figures)")
            + "* " + _measured(REPRODUCE + ["--quick"], "`--quick`"))


def reproduce_table(directory):
    """The agreement table of the full run (seeded: the same on every machine)."""
    if tuple(REPRODUCE) not in _OUTPUTS:
        reproduce_timing(directory)
    lines = _OUTPUTS[tuple(REPRODUCE)].splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("lr "))
    table = [line for line in lines[first:] if not line.startswith(("wrote", "(computed"))]
    return _fenced("\n".join(table) + "\n")


def map_timing(directory):
    from fastsgdstab.cli import demo_family

    path = directory / "demo_timing.npz"
    demo_family().save(path)
    return _measured([sys.executable, "-m", "fastsgdstab", "map", str(path), *MAP_ARGS,
                      "--no-progress"], "this example")


FAST = {"analyze-report": analyze_report, "analyze-without-replacement": analyze_without_replacement,
        "demo-report": demo_report}
SLOW = {"map-demo": map_demo}
MEASURED = {"reproduce-timing": reproduce_timing, "reproduce-table": reproduce_table,
            "map-timing": map_timing}
FILES = ["README.md", "docs/tutorials/analyze.md", "docs/tutorials/demo.md", "docs/tutorials/map.md",
         "docs/tutorials/reproduce.md", "docs/getting-started.md"]
CHECKING = False


def blocks():
    """``{name: [(path, body), ...]}`` of every generated block in the docs."""
    found = {}
    for name in FILES:
        text = (ROOT / name).read_text()
        for match in MARKER.finditer(text):
            found.setdefault(match["name"], []).append((ROOT / name, match["body"]))
    return found


def _mask(text: str) -> str:
    """Timings vary from run to run: compare everything else."""
    return re.sub(r"in \d+(\.\d+)? s", "in ... s", text)


def main(argv=None) -> int:
    global CHECKING
    argv = sys.argv[1:] if argv is None else argv
    CHECKING = "--check" in argv
    producers = dict(FAST)
    if "--slow" in argv or "--measure" in argv:
        producers.update(SLOW)
    if "--measure" in argv and not CHECKING:
        producers.update(MEASURED)
    found = blocks()
    missing = sorted((set(FAST) | set(SLOW) | set(MEASURED)) - set(found))
    if missing:
        print(f"no generated block named {', '.join(missing)} in {', '.join(FILES)}")
        return 1
    failures = []
    with tempfile.TemporaryDirectory() as directory:
        for name, produce in producers.items():
            body = produce(pathlib.Path(directory))
            for path, current in found[name]:
                if CHECKING:
                    if _mask(current) != _mask(body):
                        failures.append(f"{path.relative_to(ROOT)}: block {name} differs from what "
                                        f"the code prints now:\n{body}")
                    continue
                text = path.read_text()
                start = f"<!-- generated: {name} by docs/scripts/tutorial_outputs.py -->\n"
                end = f"<!-- end generated: {name} -->"
                pattern = re.escape(start) + r".*?" + re.escape(end)
                path.write_text(re.sub(pattern, lambda _: start + body + end, text, flags=re.S))
                print(f"wrote block {name} in {path.relative_to(ROOT)}")
    if CHECKING:
        for name in ("reproduce-timing", "map-timing"):
            for path, current in found[name]:
                if "measured on" not in current:
                    failures.append(f"{path.relative_to(ROOT)}: block {name} is not a measurement")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
