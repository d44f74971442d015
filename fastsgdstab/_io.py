"""Reading a family's array from an ``.npz`` file, refusing bad files before loading any data.

:func:`read_family_arrays` is what :meth:`fastsgdstab.HessianFamily.load` (and so the command
line) uses. It checks, in this order and without reading array data: the path is an existing
regular file; the file is a zip archive (a bare ``.npy`` array, a text/CSV file, an empty file
or other bytes are named as such); the archive opens (a truncated or corrupt one is reported,
not a ``zipfile`` traceback); it holds exactly one of the arrays ``factors``, ``hessians``,
``features``; that member is a ``.npy`` array whose header declares a real numeric dtype (never
object arrays: nothing is unpickled), a valid shape within :data:`MAX_ARRAY_BYTES`, and no more
data than the archive holds. Only then is the array read. Every file handle is closed on every
path, errors included.

Errors are ``FileNotFoundError``, ``IsADirectoryError`` or ``ValueError``, each a single line
naming the file and the problem (``PermissionError`` from ``open`` is passed through).
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["FAMILY_KEYS", "MAX_ARRAY_BYTES", "read_family_arrays", "read_optional_array",
           "read_population_size"]

# The arrays a family file may hold (exactly one of them).
FAMILY_KEYS = ("factors", "hessians", "features")

# Largest array a family file may declare, counted as the float64 copy the library makes of it
# (n d r values for factors, n d^2 for hessians, n d for features; 8 bytes each). A guard
# against corrupt or hostile headers (a few bytes can claim terabytes, and numpy would try to
# allocate them) and against typos, not a statement about what the algorithms can handle:
# 8 GiB is beyond what fits beside the working memory of the engines on a typical machine.
# A larger family can still be built in Python, e.g. HessianFamily(np.load(path, mmap_mode="r")).
MAX_ARRAY_BYTES = 8 * 2**30

_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
_NPY_MAGIC = b"\x93NUMPY"
# What reading a damaged archive or member can raise: zipfile.BadZipFile (bad directory or
# CRC), EOFError and ValueError (short reads, bad .npy headers), zlib.error (bad deflate
# stream), NotImplementedError (compression method zipfile lacks), OSError.
_READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, NotImplementedError)


class _Rejected(ValueError):
    """A file refused by a check here (passes through the handlers for damaged files)."""


def read_family_arrays(path) -> tuple[str, np.ndarray]:
    """Read the one family array of an ``.npz`` file: ``(key, array)``, key in :data:`FAMILY_KEYS`.

    Raises
    ------
    FileNotFoundError
        No such file.
    IsADirectoryError
        ``path`` is a directory.
    ValueError
        Anything else wrong with the file (see the module notes); the message names the file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "family.npz")
    >>> np.savez(path, features=np.eye(2))
    >>> key, array = read_family_arrays(path)
    >>> key, array.shape
    ('features', (2, 2))
    >>> np.save(path[:-1] + "y", np.eye(2))        # a bare .npy file
    >>> read_family_arrays(path[:-1] + "y")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...family.npy is a .npy file (a single bare array), not an .npz archive; ...
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no such file: {name}")
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name} is a directory, not an .npz file")
    if not os.path.isfile(name):
        raise ValueError(f"{name} is not a regular file; expected an .npz file")
    try:
        return _read(name)
    except _Rejected as exc:
        raise ValueError(str(exc)) from None


def read_optional_array(path, key: str):
    """The array ``key`` of an ``.npz`` family file (checked as the family array is), or None
    when the file has no such member. Call after :func:`read_family_arrays` accepted the file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle, zipfile.ZipFile(handle) as archive:
            info = {i.filename: i for i in archive.infolist()}.get(key + ".npy")
            if info is None:
                return None
            with archive.open(info) as member:
                _check_header(member, info, key, name)
            with archive.open(info) as member:
                return npy_format.read_array(member, allow_pickle=False)
    except _Rejected as exc:
        raise ValueError(str(exc)) from None
    except _READ_ERRORS as exc:
        raise ValueError(f"{name} is not a readable .npz archive (truncated or corrupt): "
                         f"{_describe(exc)}") from None


def read_population_size(path):
    """The optional ``population_size`` member of a family file (a 0-d integer), or None.

    Called after :func:`read_family_arrays` accepted the file; the member's header is checked
    like the family array's (a real dtype, no objects) and must declare a single integer. The
    value's range (>= n) is the family's check.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle, zipfile.ZipFile(handle) as archive:
            info = {item.filename: item for item in archive.infolist()}.get("population_size.npy")
            if info is None:
                return None
            with archive.open(info) as member:
                _check_header(member, info, "population_size", name)
            with archive.open(info) as member:
                array = npy_format.read_array(member, allow_pickle=False)
    except _Rejected as exc:
        raise ValueError(str(exc)) from None
    except _READ_ERRORS as exc:
        raise ValueError(f"{name} is not a readable .npz archive (truncated or corrupt): "
                         f"{_describe(exc)}") from None
    if array.shape not in ((), (1,)) or array.dtype.kind not in "iu":
        raise ValueError(f"{name}: array 'population_size' must be a single integer (the training "
                         f"set's size); got dtype {array.dtype} and shape {array.shape}")
    return int(array.reshape(()))


def _read(name: str) -> tuple[str, np.ndarray]:
    with open(name, "rb") as handle:
        _check_signature(handle.read(512), name)
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                key, info = _family_member(archive, name)
                with archive.open(info) as member:
                    _check_header(member, info, key, name)
                with archive.open(info) as member:
                    array = npy_format.read_array(member, allow_pickle=False)
        except _Rejected:
            raise
        except _READ_ERRORS as exc:
            raise _Rejected(
                f"{name} is not a readable .npz archive (truncated or corrupt): {_describe(exc)}"
            ) from None
    return key, array


def _check_signature(head: bytes, name: str) -> None:
    """Name what the file is when it is not a zip archive (from its first bytes)."""
    if head.startswith(_ZIP_SIGNATURES):
        return
    expected = f"expected an .npz archive holding one of {_keys_text()}"
    if not head:
        raise _Rejected(f"{name} is empty (0 bytes); {expected}")
    if head.startswith(_NPY_MAGIC):
        raise _Rejected(
            f"{name} is a .npy file (a single bare array), not an .npz archive; save the array "
            f"under its name with numpy.savez(path, features=array) (or factors=, hessians=)"
        )
    if _looks_like_text(head):
        raise _Rejected(
            f"{name} looks like a text file (CSV or similar), not an .npz archive; read it with "
            f"numpy.loadtxt and save the array with numpy.savez(path, features=array)"
        )
    raise _Rejected(f"{name} is not an .npz archive (no zip signature at its start); {expected}")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a multi-byte character cut at the end
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _family_member(archive: zipfile.ZipFile, name: str) -> tuple[str, zipfile.ZipInfo]:
    """The archive member holding the family: exactly one of FAMILY_KEYS (numpy's key naming)."""
    members = {}
    for info in archive.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        members.setdefault(key, info)
    keys = [key for key in FAMILY_KEYS if key in members]
    if len(keys) != 1:
        raise _Rejected(
            f"{name} must hold exactly one of the arrays {_keys_text(', ')}; it holds "
            f"{sorted(members)}"
        )
    info = members[keys[0]]
    if info.flag_bits & 0x1:
        raise _Rejected(f"{name}: array {keys[0]!r} is encrypted; save it with numpy.savez")
    return keys[0], info


def _check_header(member, info: zipfile.ZipInfo, key: str, name: str) -> None:
    """Read and check the ``.npy`` header of a member (no data)."""
    where = f"{name}: array {key!r}"
    if member.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
        raise _Rejected(f"{where} is not a .npy array (member {info.filename!r} lacks the .npy magic)")
    major, minor = member.read(2)
    if (major, minor) == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(member)
    elif (major, minor) == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(member)
    else:
        raise _Rejected(f"{where} has .npy format version {major}.{minor}; only 1.0 and 2.0 are read")
    if dtype.hasobject:
        raise _Rejected(
            f"{where} holds Python objects (dtype {dtype}), which are never unpickled; the array "
            f"must hold real numbers (bool, int or float)"
        )
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise _Rejected(f"{where} has dtype {dtype}; the array must hold real numbers (bool, int or float)")
    if any(size < 0 for size in shape):
        raise _Rejected(f"{where} declares an invalid shape {shape}")
    count = 1
    for size in shape:
        count *= size
    size_in_memory = count * max(dtype.itemsize, 8)
    if size_in_memory > MAX_ARRAY_BYTES:
        raise _Rejected(
            f"{where} declares shape {shape} ({count:,} values, {_bytes_text(size_in_memory)} as "
            f"float64), above the {_bytes_text(MAX_ARRAY_BYTES)} limit for a family read from a "
            f"file (fastsgdstab._io.MAX_ARRAY_BYTES); nothing was loaded"
        )
    declared = count * dtype.itemsize
    held = info.file_size - member.tell()
    if held < declared:
        raise _Rejected(
            f"{where} is truncated: its header declares shape {shape} ({declared:,} bytes of "
            f"{dtype}) but the archive holds {max(held, 0):,} bytes of data"
        )


def _keys_text(separator: str = ", ") -> str:
    return separator.join(repr(key) for key in FAMILY_KEYS)


def _bytes_text(size: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{size} bytes"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
