"""Hostile input to the command line and to ``HessianFamily.load`` (issue 8, items 7 and 10).

Every bad input must give one line ``fastsgdstab COMMAND: error: ...`` naming the problem and
exit code 2, before anything is computed; a bad file must not leave a file handle open.
"""

import io
import os
import time
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

import fastsgdstab as fs
import fastsgdstab.experiments
import fastsgdstab.phase
from fastsgdstab import HessianFamily
from fastsgdstab import _io
from fastsgdstab.cli import MAX_GRID_VALUES, MAX_MAP_POINTS, main


# ------------------------------------------------------------------ bad files
def _valid(path):
    np.savez(path, features=np.random.default_rng(0).standard_normal((6, 3)))


def _truncated(path):
    _valid(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _directory(path):
    path.mkdir()


def _npy(path):
    with open(path, "wb") as handle:  # np.save would append .npy to the name
        np.save(handle, np.ones((4, 2)))


def _csv(path):
    path.write_text("x1,x2\n1.0,2.0\n3.0,4.0\n")


def _garbage(path):
    path.write_bytes(bytes(range(256)))


def _header_only(shape):
    def build(path):
        # A member whose .npy header claims `shape` float64 and holds no data at all.
        with zipfile.ZipFile(path, "w") as archive:
            with archive.open("features.npy", "w") as member:
                npy_format.write_array_header_1_0(
                    member, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return build


def _pickled(path):
    np.savez(path, features=np.array([{"a": 1}, None], dtype=object))


def _no_key(path):
    np.savez(path, weights=np.ones(3))


def _two_keys(path):
    np.savez(path, features=np.ones((3, 2)), factors=np.ones((3, 2, 1)))


def _complex(path):
    np.savez(path, features=np.ones((3, 2)) + 1j)


def _structured(path):
    np.savez(path, features=np.zeros(3, dtype=[("a", "f8")]))


def _bad_crc(path):
    _valid(path)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the array data of the only member
    path.write_bytes(bytes(data))


BAD_FILES = [
    ("truncated.npz", _truncated, ValueError, "truncated or corrupt"),
    ("empty.npz", _empty, ValueError, "is empty (0 bytes)"),
    ("folder.npz", _directory, IsADirectoryError, "is a directory"),
    ("array.npy", _npy, ValueError, "is a .npy file"),
    ("data.csv", _csv, ValueError, "looks like a text file"),
    ("garbage.npz", _garbage, ValueError, "not an .npz archive"),
    ("huge.npz", _header_only((10**7, 10**7)), ValueError, "above the 8 GiB limit"),
    ("short.npz", _header_only((100, 100)), ValueError, "is truncated"),
    ("pickled.npz", _pickled, ValueError, "never unpickled"),
    ("nokey.npz", _no_key, ValueError, "exactly one of the arrays"),
    ("twokeys.npz", _two_keys, ValueError, "exactly one of the arrays"),
    ("complex.npz", _complex, ValueError, "dtype complex128"),
    ("structured.npz", _structured, ValueError, "must hold real numbers"),
    ("crc.npz", _bad_crc, ValueError, "Bad CRC-32"),
]
IDS = [case[0] for case in BAD_FILES]


@pytest.fixture
def no_computing(monkeypatch):
    """Make the expensive entry points fail the test if the command reaches them."""
    def computed(*args, **kwargs):
        raise AssertionError("the command started computing")

    monkeypatch.setattr(fastsgdstab.phase, "stability_map", computed)
    monkeypatch.setattr(fastsgdstab.experiments, "figure1", computed)
    monkeypatch.setattr(fastsgdstab.cli, "_print_report", computed)


def fails(argv, capsys):
    """Run the command; it must exit 2 with one line on stderr. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv, out=io.StringIO())
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    assert captured.err.startswith(f"fastsgdstab {argv[0]}: error: ")
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ files through the commands
@pytest.mark.parametrize("name, build, error, phrase", BAD_FILES, ids=IDS)
def test_analyze_bad_file(tmp_path, capsys, no_computing, name, build, error, phrase):
    path = tmp_path / name
    build(path)
    message = fails(["analyze", str(path), "--lr", "0.1", "--batch-size", "2"], capsys)
    assert phrase in message and str(path) in message


@pytest.mark.parametrize("name, build, error, phrase", BAD_FILES, ids=IDS)
def test_map_bad_file(tmp_path, capsys, no_computing, name, build, error, phrase):
    path = tmp_path / name
    build(path)
    message = fails(["map", str(path), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "m.png")], capsys)
    assert phrase in message and str(path) in message
    assert not (tmp_path / "m.png").exists()


def test_missing_file(tmp_path, capsys, no_computing):
    message = fails(["analyze", str(tmp_path / "missing.npz"), "--lr", "1", "--batch-size", "2"], capsys)
    assert "no such file" in message


def test_invalid_values_in_a_valid_file_name_the_file(tmp_path, capsys, no_computing):
    path = tmp_path / "nan.npz"
    np.savez(path, features=np.array([[np.nan, 1.0], [1.0, 2.0]]))
    message = fails(["analyze", str(path), "--lr", "1", "--batch-size", "2"], capsys)
    assert f"{path}: features must be finite" in message


# ------------------------------------------------------------------ HessianFamily.load itself
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@pytest.mark.parametrize("name, build, error, phrase", BAD_FILES, ids=IDS)
def test_load_rejects_and_closes(tmp_path, name, build, error, phrase):
    path = tmp_path / name
    build(path)
    before = open_descriptors()
    with pytest.raises(error) as info:
        HessianFamily.load(path)
    # Counted while the exception (and its traceback, which would keep a leaked handle alive)
    # is still referenced.
    assert open_descriptors() == before
    assert phrase in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert "allow_pickle" not in str(info.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_load_valid_file_closes_it(tmp_path):
    path = tmp_path / "good.npz"
    _valid(path)
    before = open_descriptors()
    family = HessianFamily.load(path)
    assert open_descriptors() == before
    assert (family.n, family.d) == (6, 3)


def test_load_huge_header_allocates_nothing(tmp_path):
    path = tmp_path / "huge.npz"
    _header_only((10**7, 10**7))(path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"declares shape \(10000000, 10000000\)"):
        HessianFamily.load(path)
    assert time.perf_counter() - start < 1.0


def test_size_limit_is_the_named_constant(tmp_path, monkeypatch):
    path = tmp_path / "f.npz"
    _valid(path)  # 6 x 3 float64: 144 bytes
    monkeypatch.setattr(_io, "MAX_ARRAY_BYTES", 143)
    with pytest.raises(ValueError, match="above the 143 bytes limit"):
        HessianFamily.load(path)
    monkeypatch.setattr(_io, "MAX_ARRAY_BYTES", 144)
    assert HessianFamily.load(path).n == 6


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8, np.uint16, np.bool_, ">f8"])
def test_load_accepts_every_real_dtype(tmp_path, dtype):
    path = tmp_path / "f.npz"
    features = np.array([[1, 0], [0, 1], [1, 1]], dtype=dtype)
    np.savez_compressed(path, features=np.asfortranarray(features))
    np.testing.assert_array_equal(HessianFamily.load(path).factors[:, :, 0], features.astype(float))


# ------------------------------------------------------------------ output paths
@pytest.fixture
def family_file(tmp_path):
    path = tmp_path / "family.npz"
    _valid(path)
    return path


def test_map_out_is_a_directory(tmp_path, family_file, capsys, no_computing):
    (tmp_path / "pictures").mkdir()
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "pictures")], capsys)
    assert "--out" in message and "is a directory" in message


def test_map_out_in_a_missing_directory(tmp_path, family_file, capsys, no_computing):
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "nowhere" / "m.png")], capsys)
    assert "--out" in message and "does not exist" in message


def test_map_save_in_a_missing_directory(tmp_path, family_file, capsys, no_computing):
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "m.png"), "--save", str(tmp_path / "nowhere" / "m.npz")], capsys)
    assert "--save" in message and "does not exist" in message


def test_map_save_is_a_directory(tmp_path, family_file, capsys, no_computing):
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "m.png"), "--save", str(tmp_path)], capsys)
    assert "--save" in message and "is a directory" in message


def test_map_out_and_save_the_same_file(tmp_path, family_file, capsys, no_computing):
    path = str(tmp_path / "m.png")
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", path, "--save", path], capsys)
    assert "same file" in message


def test_map_out_unknown_image_format(tmp_path, family_file, capsys, no_computing):
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1",
                     "--out", str(tmp_path / "m.xyz")], capsys)
    assert "cannot write .xyz files" in message


def test_reproduce_out_is_an_existing_file(tmp_path, capsys, no_computing):
    (tmp_path / "taken").write_text("")
    message = fails(["reproduce", "figure1", "--quick", "--no-plot", "--out", str(tmp_path / "taken")], capsys)
    assert "exists and is not a directory" in message


def test_reproduce_out_below_a_file(tmp_path, capsys, no_computing):
    (tmp_path / "taken").write_text("")
    message = fails(["reproduce", "figure1", "--quick", "--no-plot",
                     "--out", str(tmp_path / "taken" / "sub")], capsys)
    assert "cannot create it" in message and "is not a directory" in message


@pytest.mark.parametrize("command", [["map", "family.npz", "--lrs", "0.1", "--batch-sizes", "1"],
                                     ["reproduce", "figure1", "--quick", "--no-plot"]])
def test_empty_out(command, capsys, no_computing):
    assert "--out must not be empty" in fails([*command, "--out", ""], capsys)


def test_reproduce_output_file_is_a_directory(tmp_path, capsys, no_computing):
    (tmp_path / "out" / "figure1.csv").mkdir(parents=True)
    message = fails(["reproduce", "figure1", "--quick", "--no-plot", "--out", str(tmp_path / "out")], capsys)
    assert "figure1.csv is a directory" in message


# ------------------------------------------------------------------ sizes and counts
@pytest.mark.parametrize("option, grid", [
    ("--lrs", "0.1:1:1000000000"),
    ("--lrs", "0.1:1:1000000000:log"),
    ("--lrs", "0.1,0.2,1:2:99999"),
    ("--batch-sizes", "1:5:" + "9" * 5000),  # beyond Python's int-from-string digit limit
])
def test_map_grid_too_large(family_file, capsys, no_computing, option, grid):
    other = "--batch-sizes" if option == "--lrs" else "--lrs"
    start = time.perf_counter()
    message = fails(["map", str(family_file), option, grid, other, "1"], capsys)
    assert time.perf_counter() - start < 1.0
    assert f"{option}: " in message and f"at most {MAX_GRID_VALUES:,} per grid" in message


def test_map_grid_limit_is_inclusive(family_file, capsys, monkeypatch, tmp_path):
    seen = {}

    def stability_map(family, lrs, batch_sizes, **kwargs):
        seen["sizes"] = (lrs.size, batch_sizes.size)
        raise KeyboardInterrupt  # stop here: the checks passed

    monkeypatch.setattr(fastsgdstab.phase, "stability_map", stability_map)
    with pytest.raises(KeyboardInterrupt):
        main(["map", str(family_file), "--lrs", f"0.1:1:{MAX_GRID_VALUES}", "--batch-sizes", "1",
              "--out", str(tmp_path / "m.png")])
    assert seen["sizes"] == (MAX_GRID_VALUES, 1)


def test_map_too_many_grid_points(family_file, capsys, no_computing):
    side = int(MAX_MAP_POINTS ** 0.5) + 1
    message = fails(["map", str(family_file), "--lrs", f"0.1:1:{side}", "--batch-sizes", f"1:6:{side}"], capsys)
    assert f"at most {MAX_MAP_POINTS:,} are accepted" in message


def test_map_bad_grid_values_still_name_the_option(family_file, capsys, no_computing):
    assert "--lrs: cannot read" in fails(["map", str(family_file), "--lrs", "0.1:1:x", "--batch-sizes", "1"], capsys)
    assert "--lrs: cannot read" in fails(["map", str(family_file), "--lrs", "0.1:1:\u00b2", "--batch-sizes", "1"], capsys)


@pytest.mark.parametrize("argv, phrase", [
    (["--runs", "0"], "--runs must be an integer in [1, 100,000]; got 0"),
    (["--runs", "1000000000"], "--runs must be an integer in [1, 100,000]"),
    (["--steps", "0"], "--steps must be an integer in [1, 10,000,000]"),
    (["--steps", "100000000000"], "--steps must be an integer in [1, 10,000,000]"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63 - "),
    (["--seed", str(2**63 - 1)], "--seed must be an integer in [0, 2**63 - "),
])
def test_reproduce_counts(tmp_path, capsys, no_computing, argv, phrase):
    message = fails(["reproduce", "figure1", "--quick", "--no-plot", "--out", str(tmp_path / "o"), *argv], capsys)
    assert phrase in message
    assert not (tmp_path / "o").exists()


def test_reproduce_repeated_lrs_are_one_panel(tmp_path, monkeypatch):
    seen = {}

    def figure1(lrs, samplings, **kwargs):
        seen["lrs"], seen["samplings"] = lrs, samplings
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsgdstab.experiments, "figure1", figure1)
    with pytest.raises(KeyboardInterrupt):
        main(["reproduce", "figure1", "--quick", "--no-plot", "--lr", "0.5", "0.50", "0.2",
              "--sampling", "bernoulli", "bernoulli", "--out", str(tmp_path / "o")])
    assert seen == {"lrs": (0.5, 0.2), "samplings": ("bernoulli",)}


# ------------------------------------------------------------------ which errors are user errors
def test_validation_type_error_exits_2(monkeypatch, capsys):
    from fastsgdstab._validation import check_real_scalar

    def report(*args):
        check_real_scalar("fast", "lr")

    monkeypatch.setattr(fastsgdstab.cli, "_print_report", report)
    assert "lr must be a real number" in fails(["demo", "--lr", "0.1"], capsys)


def test_internal_type_error_keeps_its_traceback(monkeypatch):
    def report(*args):
        raise TypeError("an internal bug")

    monkeypatch.setattr(fastsgdstab.cli, "_print_report", report)
    with pytest.raises(TypeError, match="an internal bug"):
        main(["demo", "--lr", "0.1"], out=io.StringIO())


def test_os_error_is_one_line_without_errno(monkeypatch, capsys):
    def report(*args):
        open("/nonexistent-dir-fastsgdstab/x")

    monkeypatch.setattr(fastsgdstab.cli, "_print_report", report)
    message = fails(["demo", "--lr", "0.1"], capsys)
    assert message == "fastsgdstab demo: error: /nonexistent-dir-fastsgdstab/x: No such file or directory\n"


# ------------------------------------------------------------------ --version
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"fastsgdstab {fs.__version__}\n"


@pytest.mark.parametrize("argv, message", [
    (["demo", "--lr", "-1"], "--lr must be > 0"),
    (["demo", "--batch-size", "0"], "--batch-size must lie in"),
    (["demo", "--batch-size", "2.5", "--sampling", "without_replacement"], "--batch-size must be an integer"),
])
def test_library_messages_use_command_line_syntax(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""  # checked before anything is printed


# ------------------------------------------------------------------ progress of long commands
def _map_argv(family_file, tmp_path, *extra):
    return ["map", str(family_file), "--lrs", "0.05:1.5:6", "--batch-sizes", "1:6:12",
            "--out", str(tmp_path / "m.png"), *extra]


def test_map_quiet_when_short_and_not_a_terminal(family_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(fastsgdstab.cli, "PROGRESS_AFTER_SECONDS", 1e9)  # every run is "short"
    assert main(_map_argv(family_file, tmp_path), out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_map_prints_a_line_per_block_when_long(family_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(fastsgdstab.cli, "PROGRESS_AFTER_SECONDS", 0.0)  # every run is "long"
    assert main(_map_argv(family_file, tmp_path), out=io.StringIO()) == 0
    lines = capsys.readouterr().err.splitlines()
    blocks = min(fastsgdstab.cli.MAP_PROGRESS_BLOCKS, 12)
    assert len(lines) == blocks, lines
    assert lines[0].startswith("map: batch sizes 1 to ")
    assert lines[-1].startswith("map: batch sizes ") and " 12 of 12 rows" in lines[-1]
    rows = [int(line.split(" of 12 rows")[0].rsplit(" ", 1)[1]) for line in lines]
    assert rows == sorted(rows) and rows[-1] == 12


def test_map_no_progress(family_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(fastsgdstab.cli, "PROGRESS_AFTER_SECONDS", 0.0)
    assert main(_map_argv(family_file, tmp_path, "--no-progress"), out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_map_in_blocks_is_the_map(family_file, tmp_path):
    """The command computes its rows in blocks (for progress): the same critical lrs, and each
    spectral radius within the proven brackets of the single call."""
    pytest.importorskip("matplotlib")
    save = tmp_path / "grid.npz"
    lrs, batch_sizes = "0.05:1.5:6", "6,1,3:5:3,2"  # unsorted on purpose
    assert main(["map", str(family_file), "--lrs", lrs, "--batch-sizes", batch_sizes, "--out",
                 str(tmp_path / "m.png"), "--save", str(save)], out=io.StringIO()) == 0
    family = HessianFamily.load(family_file)
    from fastsgdstab.cli import parse_grid

    whole = fs.stability_map(family, parse_grid(lrs), parse_grid(batch_sizes))
    with np.load(save) as saved:
        np.testing.assert_array_equal(saved["batch_sizes"], whole.batch_sizes)
        np.testing.assert_array_equal(saved["critical_lr"], whole.critical_lr)
        tolerance = saved["radius_error"] + whole.radius_error
        assert np.all(np.abs(saved["spectral_radius"] - whole.spectral_radius) <= tolerance)


def test_map_checks_every_batch_size_before_computing(family_file, tmp_path, capsys, no_computing):
    message = fails(["map", str(family_file), "--lrs", "0.1", "--batch-sizes", "1:6:20,7",
                     "--out", str(tmp_path / "m.png")], capsys)
    assert "--batch-size" in message


@pytest.fixture
def small_figure1(monkeypatch):
    """figure1 on a 2 x 2 grid of (sigma, batch size) per panel, whatever the command asks."""
    real = fastsgdstab.experiments.figure1

    def figure1(lrs, samplings, **kwargs):
        kwargs.update(sigmas=[1, 50], batch_sizes=[1, 49])
        return real(lrs, samplings, **kwargs)

    monkeypatch.setattr(fastsgdstab.experiments, "figure1", figure1)


def test_reproduce_prints_a_line_per_panel_when_not_a_terminal(tmp_path, capsys, small_figure1):
    assert main(["reproduce", "figure1", "--quick", "--no-plot", "--runs", "2", "--steps", "5",
                 "--lr", "0.5", "0.8", "--sampling", "bernoulli", "--out", str(tmp_path / "o")],
                out=io.StringIO()) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" done")[0] for line in lines] == [
        "figure1: panel 1 of 2 (lr = 0.5, bernoulli)", "figure1: panel 2 of 2 (lr = 0.8, bernoulli)"]
    assert " 4 of 8 cells" in lines[0] and " 8 of 8 cells" in lines[1]


def test_reproduce_no_progress(tmp_path, capsys, small_figure1):
    assert main(["reproduce", "figure1", "--quick", "--no-plot", "--runs", "2", "--steps", "5", "--lr", "0.5",
                 "--sampling", "bernoulli", "--no-progress", "--out", str(tmp_path / "o")],
                out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_figure1_progress_callable_hears_each_panel():
    heard = []
    result = fastsgdstab.experiments.figure1(
        lrs=[0.2, 0.5], samplings=["bernoulli", "without_replacement"], sigmas=[1, 3],
        batch_sizes=[2], n=6, runs=2, steps=5, progress=lambda *args: heard.append(args))
    assert heard == [(0.2, "bernoulli", 2, 8), (0.2, "without_replacement", 4, 8),
                     (0.5, "bernoulli", 6, 8), (0.5, "without_replacement", 8, 8)]
    assert result.panels() == [(lr, s) for lr, s, _, _ in heard]
