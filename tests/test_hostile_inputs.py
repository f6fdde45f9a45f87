"""Hostile and malformed inputs, found by a machine (issue 22, item 5).

Property-based tests (hypothesis) write real files in the real formats (``.npz``, PHiSeg HDF5,
DeepMind PNG trees, QUBIQ NIfTI case folders, and ``probseg sample``'s ``.npy`` / ``.png`` /
``.nii[.gz]`` inputs) with random shapes (0-size axes, wrong rank), dtypes (float16/32/64, ints,
bool, complex, strings), NaN/Inf, missing and extra keys, truncated and corrupted bytes, huge
declared sizes and odd or non-UTF-8 file names. Every input must give a valid data set (whose
items have the expected shapes) or one of the library's own errors whose message names the file;
never another exception type, a hang (a wall-clock guard per example, besides hypothesis'
``deadline``) or a memory blow-up (the address space is capped while a loader runs, and an error
caused by a MemoryError counts as a failure).

The number of generated inputs that ran is printed at the end of the module and recorded in
:data:`RAN`. Set ``PROBSEG_FUZZ=1`` to draw new random inputs instead of the fixed
(derandomized) ones, and ``PROBSEG_FUZZ_EXAMPLES=N`` to scale every test to about N examples.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import pickle
import signal
import struct
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from probseg.data import ArrayDataModule, LIDCDataModule
from probseg.data.arrays import MAX_MEMBER_BYTES, load_npz
from probseg.data.lidc import read_lidc_pickle
from probseg.data.qubiq import QUBIQDataModule
from probseg.io import InputError
from probseg.sampling import SamplingError, collect_inputs

EXPECTED = (ValueError, KeyError, FileNotFoundError, PermissionError, InputError, SamplingError)
"""The library's error types: an input may fail only with one of these."""
NOT_EXPECTED = (UnicodeError,)
"""ValueError subclasses that are a reader's crash, not the library's message."""

RAN: Counter[str] = Counter()
"""Generated inputs that ran, per test (and per outcome)."""

FUZZ = os.environ.get("PROBSEG_FUZZ") == "1"
SCALE = int(os.environ.get("PROBSEG_FUZZ_EXAMPLES", "0"))
GUARD_S = 20.0
"""Per-example wall-clock guard: an example running longer is a hang."""
MEMORY_HEADROOM = 2 << 30
"""Address space a loader may add while it runs (a declared size above it must be refused first)."""


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=SCALE or examples, deadline=10_000, derandomize=not FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture], print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report_count(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    total = sum(n for key, n in RAN.items() if ":" not in key and "/" not in key)
    line = f"hostile inputs: {total} generated inputs ran ({', '.join(f'{k}={v}' for k, v in sorted(RAN.items()))})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}")


class Hang(BaseException):
    """Raised by the guard; a BaseException so that a reader's ``except Exception`` cannot hide it."""


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Fail an example that runs longer than GUARD_S or asks for more than MEMORY_HEADROOM of memory."""
    alarm = hasattr(signal, "setitimer") and sys.platform != "win32"
    if alarm:
        def _hang(signum: int, frame: Any) -> None:
            raise Hang(f"an example ran longer than {GUARD_S} s")

        previous = signal.signal(signal.SIGALRM, _hang)
        signal.setitimer(signal.ITIMER_REAL, GUARD_S)
    cap = None
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:")))
        cap = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm_kib * 1024 + MEMORY_HEADROOM
        if cap[1] == resource.RLIM_INFINITY or limit < cap[1]:
            resource.setrlimit(resource.RLIMIT_AS, (limit, cap[1]))
        else:
            cap = None
    except (ImportError, OSError, ValueError, StopIteration):
        cap = None
    try:
        yield
    finally:
        if cap is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, cap)
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def attempt(test: str, call: Callable[[], Any], names: tuple[str, ...], keys: tuple[str, ...] = ()) -> Any:
    """Run ``call``; return its value, or None after an allowed error naming one of ``names``.

    ``keys``: when given, the message must also name one of them (the bad key is known).
    """
    RAN[test] += 1
    try:
        with guarded(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = call()
        lossy = [w for w in caught if issubclass(w.category, (np.exceptions.ComplexWarning, RuntimeWarning))]
        assert not lossy, f"a reader changed the data silently: {lossy[0].message}"
    except EXPECTED as err:
        lossy = [w for w in caught if issubclass(w.category, np.exceptions.ComplexWarning)]
        assert not lossy, f"a reader changed the data silently: {lossy[0].message}"
        if isinstance(err, NOT_EXPECTED):
            raise AssertionError(f"{type(err).__name__} escaped a reader: {err}") from err
        if any(isinstance(e, MemoryError) for e in _chain(err)):
            raise AssertionError(f"a reader tried to allocate too much before refusing: {err}") from err
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        assert any(name in message for name in names), f"{type(err).__name__} does not name {names}: {message}"
        if keys:
            assert any(key in message for key in keys), f"{type(err).__name__} does not name a key of {keys}: {message}"
        RAN[f"{test}:refused"] += 1
        return None
    RAN[f"{test}:loaded"] += 1
    return value


# ---------------------------------------------------------------------------------------------
# shared strategies

ODD_NAMES = ["data", "spa ce", "ünïcödé", "日本語", "emoji😀", "-dash", "a.b.c", "x" * 120, "tab\tname",
             "new\nline", "quote'\"", "back\\slash", "%s{}", "ends.", "UPPER"]


@st.composite
def file_stems(draw: st.DrawFn) -> str:
    """A file name stem: odd unicode, or (where the OS allows) undecodable bytes via os.fsdecode."""
    kind = draw(st.sampled_from(["plain", "odd", "text", "bytes"]))
    if kind == "plain":
        return "data"
    if kind == "odd":
        return draw(st.sampled_from(ODD_NAMES))
    if kind == "text":
        alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
        stem = draw(st.text(alphabet, min_size=1, max_size=10))
        return stem if stem not in (".", "..") else "dots"
    raw = draw(st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\x00" not in b))
    return os.fsdecode(b"\xff\xfe" + raw)


def make_file(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, or a plain name where the file system refuses the odd one."""
    path = folder / (stem + suffix)
    try:
        path.touch()
        if path.name != stem + suffix or not path.exists():
            raise OSError("name changed")
        path.unlink()
        return path
    except (OSError, UnicodeError, ValueError):
        return folder / ("plain" + suffix)


def make_dir(folder: Path, stem: str) -> Path:
    path = folder / stem
    try:
        path.mkdir(parents=True)
        return path
    except (OSError, UnicodeError, ValueError):
        path = folder / "plain"
        path.mkdir(parents=True, exist_ok=True)
        return path


FILE_DAMAGE = st.sampled_from(["none"] * 6 + ["truncate", "flip", "garbage", "empty"])


def damage_bytes(data: bytes, how: str, where: float, flips: list[int]) -> bytes:
    """The file's bytes damaged: cut at a random point, random bytes flipped, or replaced."""
    if how == "truncate":
        return data[: int(where * len(data))]
    if how == "flip":
        out = bytearray(data)
        for k, f in enumerate(flips):
            pos = int((where + k * 0.137) % 1.0 * len(out))
            out[pos] ^= f or 0xFF
        return bytes(out)
    if how == "garbage":
        return bytes(flips) * 7 + b"\x00\x01 not the format"
    if how == "empty":
        return b""
    return data


def damaged(path: Path, how: str, where: float, flips: list[int]) -> None:
    if how != "none" and path.is_file():
        path.write_bytes(damage_bytes(path.read_bytes(), how, where, flips))


DAMAGE_ARGS = st.tuples(FILE_DAMAGE, st.floats(0, 1), st.lists(st.integers(0, 255), min_size=1, max_size=8))

FLOATS = ["float16", "float32", "float64", ">f8"]
INTS = ["uint8", "int8", "int16", "uint16", "int32", "int64", "uint64", ">i4"]
ODD = ["bool", "complex64", "complex128", "<U3", "S3", "datetime64[s]", [("a", "<f4"), ("b", "<i2")]]


def elements(dtype: np.dtype) -> st.SearchStrategy | None:
    if dtype.kind == "f":
        return st.floats(width=min(64, dtype.itemsize * 8), allow_nan=True, allow_infinity=True)
    if dtype.kind == "S":
        return st.binary(max_size=dtype.itemsize)
    return None


def any_array(dtypes: list, shape: st.SearchStrategy) -> st.SearchStrategy:
    return st.sampled_from(dtypes).map(np.dtype).flatmap(
        lambda d: hnp.arrays(d, shape, elements=elements(d)))


def poke(array: np.ndarray, index: int, value: float) -> None:
    """Set one element, wrapping or overflowing as a cast would (a hostile value, not a test error)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array.flat[index] = np.asarray(value).astype(array.dtype)


def npy_header(shape: Any, descr: Any, version: tuple[int, int] = (1, 0), fortran: Any = False) -> bytes:
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    (npformat.write_array_header_1_0 if version == (1, 0) else npformat.write_array_header_2_0)(buf, header)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


HUGE_HEADERS = st.sampled_from([
    ((2**40,), "<f8"), ((2**20, 2**20, 1, 1), "<f4"), ((1000, 1, 1000, 1000), "|u1"), ((3, 1, 4, 4), "<f8"),
    ((2**62, 4), "<f8"), ((-1, 1, 4, 4), "<f4"), ((2**31, 1, 2**31, 1), "|b1"), ((10**9, 0, 3, 3), "<f4"),
    ((2**40, 1, 1, 1), "|S0"), ((2**20, 1, 2**20, 1), "<U0"), ((), "<f4"), ((3,), "O"), ((3, 1, 4, 4), "<c16"),
    ((3, 1, 4, 4), "x9"), ((3, "a", 4, 4), "<f4"),
])

# ---------------------------------------------------------------------------------------------
# .npz (ArrayDataModule, LIDC format "npz")

SPLITS = ("train", "val", "test")


@st.composite
def npz_files(draw: st.DrawFn) -> dict[str, Any]:
    """Members of a multi-rater .npz, consistent at first, then damaged member by member."""
    n, c, r = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays: dict[str, Any] = {
        "images": rng.random((n, c, h, w)).astype(draw(st.sampled_from(FLOATS + ["uint8"]))),
        "masks": rng.integers(0, 2, (n, r, h, w)).astype(draw(st.sampled_from(["uint8", "int64", "bool", "float32"]))),
    }
    for key in ("rater_mask", "patients", "ids", "split", "series"):
        if draw(st.booleans()):
            arrays[key] = {
                "rater_mask": np.ones((n, r), dtype=bool),
                "patients": np.array([f"p{i % 2}" for i in range(n)]),
                "ids": np.array([f"i{i}" for i in range(n)]),
                "split": np.array([SPLITS[i % 3] for i in range(n)]),
                "series": np.arange(n),
            }[key]
    keys = ["images", "masks", "rater_mask", "patients", "ids", "split", "series", "extra"]
    damages = draw(st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(
        ["dtype", "shape", "nan", "values", "drop", "huge", "garbage", "object", "nosuffix", "zero", "scalar",
         "nonutf8"])), max_size=3))
    members: dict[str, bytes] = {}
    bad_key = None
    for key, damage in damages:
        bad_key = key
        if damage == "drop":
            arrays.pop(key, None)
        elif damage == "dtype":
            arrays[key] = draw(any_array(FLOATS + INTS + ODD, st.just(np.shape(arrays.get(key, np.zeros(n))))))
        elif damage == "shape":
            arrays[key] = draw(any_array(FLOATS + INTS + ["bool"], hnp.array_shapes(min_dims=0, max_dims=5,
                                                                                   min_side=0, max_side=4)))
        elif damage == "zero":
            shape = list(np.shape(arrays.get(key, np.zeros((n, 1, h, w)))) or [1])
            shape[draw(st.integers(0, len(shape) - 1))] = 0
            arrays[key] = np.zeros(shape, dtype=np.asarray(arrays.get(key, 0.0)).dtype)
        elif damage == "scalar":
            arrays[key] = np.array(draw(st.sampled_from(["abc", 3, 2.5, True])))
        elif damage == "nonutf8":
            arrays[key] = np.array([b"\xff\xfe" + bytes([i]) for i in range(n)])
        elif damage == "nan" and key in arrays and np.asarray(arrays[key]).dtype.kind == "f":
            a = np.array(arrays[key])
            if a.size:
                poke(a, draw(st.integers(0, a.size - 1)), draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300])))
            arrays[key] = a
        elif damage == "values" and key in arrays:
            a = np.array(arrays[key])
            if a.size and a.dtype.kind in "iuf":
                poke(a, draw(st.integers(0, a.size - 1)), draw(st.sampled_from([-1, 2, 7, 255, 0.5])))
            elif a.size and a.dtype.kind == "U":
                a.flat[0] = draw(st.sampled_from(["", "trian", "i0", "p1", "é"]))
            arrays[key] = a
        elif damage == "huge":
            shape, descr = draw(HUGE_HEADERS)
            members[key + ".npy"] = npy_header(shape, descr, draw(st.sampled_from([(1, 0), (2, 0)]))) + bytes(
                draw(st.integers(0, 256)))
            arrays.pop(key, None)
        elif damage == "garbage":
            members[key + ".npy"] = draw(st.binary(max_size=200))
            arrays.pop(key, None)
        elif damage == "object":
            members[key + ".npy"] = npy_bytes(np.array([{"a": 1}] * n + [None], dtype=object))
            arrays.pop(key, None)
        elif damage == "nosuffix" and key in arrays:
            members[key] = npy_bytes(np.asarray(arrays.pop(key)))
    for key, array in arrays.items():
        members.setdefault(key + ".npy", npy_bytes(np.asarray(array)))
    return {"members": members, "compressed": draw(st.booleans()), "channels": c, "rater": r, "size": (h, w),
            "damage": draw(DAMAGE_ARGS), "stem": draw(file_stems()), "bad_key": bad_key, "n": n}


def write_zip(path: Path, members: dict[str, bytes], compressed: bool) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def check_datasets(test: str, dm: Any, names: tuple[str, ...], channels: int, size: tuple[int, int] | None,
                   source: str | None = None) -> None:
    """Every split is a data set of well-formed items, or an allowed error naming the file (or
    ``source``, the data set, for a split that comes out empty)."""
    for split in SPLITS:
        ds = attempt("split/" + test, lambda: dm.dataset(split), names if source is None else (*names, source))
        if ds is None:
            continue
        for i in range(len(ds)):
            item = ds[i]
            image, masks = item["image"], item["masks"]
            assert image.dtype.is_floating_point and image.ndim == 3 and image.shape[0] == channels
            assert bool(image.isfinite().all())
            assert masks.ndim == 3 and masks.shape[1:] == image.shape[1:]
            assert item["rater_mask"].shape == masks.shape[:1]
            if size is not None:
                assert tuple(image.shape[1:]) == size


@fuzz_settings(300)
@given(spec=npz_files())
def test_npz_loader_survives_hostile_files(spec: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), spec["stem"], ".npz")
        write_zip(path, spec["members"], spec["compressed"])
        damaged(path, *spec["damage"])
        names = (path.name,)
        arrays = attempt("npz", lambda: load_npz(path), names)
        if arrays is None:
            return
        assert isinstance(arrays.images, np.ndarray) and arrays.images.dtype == np.float32
        dm = ArrayDataModule(str(path), split_mode="given", fractions=(0.34, 0.33, 0.33),
                             in_channels=spec["channels"], batch_size=2)
        check_datasets("npz", dm, names, spec["channels"], None)
        if spec["channels"] == 1:
            lidc = LIDCDataModule(str(path), format="npz", split_mode="random", fractions=(0.34, 0.33, 0.33))
            check_datasets("npz", lidc, names, 1, None)


@fuzz_settings(120)
@given(shape_descr=HUGE_HEADERS, version=st.sampled_from([(1, 0), (2, 0)]), key=st.sampled_from(
    ["images", "masks", "rater_mask", "ids", "patients", "split", "series"]), extra=st.integers(0, 4096),
    compressed=st.booleans(), stem=file_stems())
def test_npz_refuses_huge_declared_sizes_before_reading(shape_descr: tuple, version: tuple, key: str, extra: int,
                                                        compressed: bool, stem: str) -> None:
    """A member whose header declares more than it can hold (or more than the limit) is refused,
    naming the file and the key, without allocating the declared size."""
    shape, descr = shape_descr
    good = {"images": np.zeros((3, 1, 4, 4), np.float32), "masks": np.zeros((3, 1, 4, 4), np.uint8)}
    members = {k + ".npy": npy_bytes(v) for k, v in good.items()}
    members[key + ".npy"] = npy_header(shape, descr, version) + b"\x01" * extra
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), stem, ".npz")
        write_zip(path, members, compressed)
        declared = int(np.prod([int(s) for s in shape if isinstance(s, int)] or [1], dtype=object))
        must_fail = declared * 8 > extra or not all(isinstance(s, int) and s >= 0 for s in shape)
        arrays = attempt("npz-huge", lambda: load_npz(path), (path.name,), keys=(key,) if must_fail else ())
        if must_fail:
            assert arrays is None, f"{shape} {descr} with {extra} bytes was loaded"


def test_npz_member_limit_is_stated_and_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from probseg.data import arrays as arrays_module

    assert MAX_MEMBER_BYTES == 8 << 30
    path = tmp_path / "small.npz"
    np.savez(path, images=np.zeros((3, 1, 8, 8), np.float32), masks=np.zeros((3, 1, 8, 8), np.uint8))
    monkeypatch.setattr(arrays_module, "MAX_MEMBER_BYTES", 512)
    with pytest.raises(ValueError, match=r"small.npz: 'images' declares shape \(3, 1, 8, 8\).*768 bytes.*limit"):
        load_npz(path)


def test_every_reader_applies_the_stated_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HDF5, NIfTI and ``probseg sample`` readers refuse a declared size above the limit too."""
    h5py = pytest.importorskip("h5py")
    from probseg import io as io_module
    from probseg.data import arrays as arrays_module
    from probseg.data.qubiq import _read_nifti
    from probseg.io import MAX_IMAGE_BYTES, load_image_file

    assert MAX_IMAGE_BYTES == MAX_MEMBER_BYTES
    with h5py.File(tmp_path / "lidc.hdf5", "w") as f:
        g = f.create_group("train")
        g["images"], g["labels"] = np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8, 4), np.uint8)
        g["uids"] = np.array([b"a", b"b"])
    (tmp_path / "image.nii.gz").write_bytes(nifti_bytes(np.zeros((8, 8), np.float32), True))
    np.save(tmp_path / "image.npy", np.zeros((8, 8), np.float32))
    monkeypatch.setattr(arrays_module, "MAX_MEMBER_BYTES", 100)
    monkeypatch.setattr(io_module, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ValueError, match=r"lidc.hdf5: train/images declares shape \(2, 8, 8\).*limit of 100 bytes"):
        _ = LIDCDataModule(str(tmp_path / "lidc.hdf5"), format="hdf5").arrays
    with pytest.raises(ValueError, match=r"image.nii.gz: NIfTI header declares shape \(8, 8\).*limit of 100 bytes"):
        _read_nifti(tmp_path / "image.nii.gz")
    for name in ("image.nii.gz", "image.npy"):
        with pytest.raises(InputError, match=rf"{name}: its header declares shape \(8, 8\).*limit of 100 bytes"):
            load_image_file(tmp_path / name, 1)


# ---------------------------------------------------------------------------------------------
# LIDC HDF5 (PHiSeg)


@st.composite
def hdf5_specs(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.just(list(SPLITS)) | st.lists(st.sampled_from([*SPLITS, "extra"]), max_size=4, unique=True))
    h, w, r = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    content = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for g in groups:
        n = draw(st.integers(0, 3) | st.just(2))
        content[g] = {"images": rng.random((n, h, w)).astype(draw(st.sampled_from(FLOATS + ["uint8"]))),
                      "labels": rng.integers(0, 2, (n, h, w, r)).astype(draw(st.sampled_from(["uint8", "float32",
                                                                                              "bool", "int64"]))),
                      "uids": np.array([f"{g}-p{i}".encode() for i in range(n)], dtype="S")}
    damages = draw(st.lists(st.tuples(st.sampled_from(["images", "labels", "uids"]), st.sampled_from(
        ["dtype", "shape", "nan", "values", "drop", "huge", "group", "nonutf8", "scalar", "zero", "strings"])),
        max_size=3))
    for key, damage in damages:
        if not content:
            break
        g = draw(st.sampled_from(sorted(content)))
        item = content[g]
        old = item.get(key, np.zeros(1))
        old = np.zeros(1) if isinstance(old, tuple) else np.asarray(old)
        if damage == "drop":
            item.pop(key, None)
        elif damage == "dtype":
            item[key] = draw(any_array(FLOATS + INTS + ["bool", "complex64", "S3"], st.just(old.shape)))
        elif damage == "shape":
            item[key] = draw(any_array(FLOATS + INTS, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0,
                                                                      max_side=4)))
        elif damage == "nan" and old.dtype.kind == "f" and old.size:
            a = old.copy()
            poke(a, 0, draw(st.sampled_from([np.nan, np.inf, 1e300])))
            item[key] = a
        elif damage == "values" and old.dtype.kind in "iuf" and old.size:
            a = old.copy()
            poke(a, 0, 3)
            item[key] = a
        elif damage == "huge":
            item[key] = ("huge", draw(st.sampled_from([(2**30, 128, 128), (2**20, 64, 64, 4), (2**40,)])))
        elif damage == "group":
            item[key] = ("group", None)
        elif damage == "nonutf8":
            item[key] = np.array([b"\xff\xfe" + bytes([i]) for i in range(max(1, len(old) if old.ndim else 1))])
        elif damage == "scalar":
            item[key] = np.array(draw(st.sampled_from([b"abc", 3.0, 7])))
        elif damage == "zero" and old.ndim:
            shape = list(old.shape)
            shape[draw(st.integers(0, len(shape) - 1))] = 0
            item[key] = np.zeros(shape, old.dtype)
        elif damage == "strings":
            item[key] = np.array([b"x"] * max(1, len(old) if old.ndim else 1))
    return {"content": content, "damage": draw(DAMAGE_ARGS), "stem": draw(file_stems())}


def write_hdf5(path: Path, content: dict[str, dict[str, Any]]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for group, item in content.items():
            g = f.create_group(group)
            for key, value in item.items():
                if isinstance(value, tuple) and value[0] == "huge":
                    g.create_dataset(key, shape=value[1], dtype="f4", chunks=True)
                elif isinstance(value, tuple):
                    g.create_group(key)
                else:
                    g[key] = value


@fuzz_settings(150)
@given(spec=hdf5_specs())
def test_lidc_hdf5_survives_hostile_files(spec: dict[str, Any]) -> None:
    pytest.importorskip("h5py")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), spec["stem"], ".hdf5")
        write_hdf5(path, spec["content"])
        damaged(path, *spec["damage"])
        names = (path.name,)
        dm = LIDCDataModule(str(path), format="hdf5", batch_size=2)
        arrays = attempt("hdf5", lambda: dm.arrays, names)
        if arrays is not None:
            check_datasets("hdf5", dm, names, 1, None)


# ---------------------------------------------------------------------------------------------
# LIDC PNG crops (DeepMind)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


def crafted_png(width: int, height: int, color_type: int = 0, depth: int = 8) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` over a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG_IMAGES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16"])
              ).map(lambda t: ("ok", t)),
    st.sampled_from([(200000, 200000), (20000, 20000), (1, 2**31 - 1), (0, 5), (12000, 12000)]).map(
        lambda t: ("huge", t)),
)


def render_png(kind: str, spec: tuple, rng: np.random.Generator, binary: bool = False) -> bytes:
    if kind == "huge":
        return crafted_png(*spec)
    h, w, mode = spec
    if mode == "I;16":
        array = (rng.integers(0, 2, (h, w)) * 65535 if binary else rng.integers(0, 65536, (h, w))).astype(np.uint16)
        return png_bytes(array)
    array = (rng.integers(0, 2, (h, w)) * 255 if binary else rng.integers(0, 256, (h, w))).astype(np.uint8)
    return png_bytes(array, None if mode == "L" else mode)


@st.composite
def png_trees(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.integers(4, 10))
    return {
        "size": size,
        "image": draw(st.sampled_from(["L", "RGB", "I;16", "P"]).map(lambda m: ("ok", (size, size, m))) | PNG_IMAGES),
        "masks": draw(st.lists(st.just(("ok", (size, size, "L"))), min_size=4, max_size=4)
                      | st.lists(PNG_IMAGES | st.just(("ok", (size, size, "L"))), min_size=0, max_size=5)),
        "raters_from": draw(st.integers(0, 2)),
        "patient": draw(file_stems()),
        "image_name": draw(st.sampled_from(["z-1.5_c0.png", "z--3_c12.png", "z-1..2_c0.png", "z-x_c0.png"])),
        "damage": draw(DAMAGE_ARGS),
        "damaged": draw(st.sampled_from(["image", "mask"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@fuzz_settings(120)
@given(spec=png_trees())
def test_lidc_png_survives_hostile_trees(spec: dict[str, Any]) -> None:
    rng = np.random.default_rng(spec["seed"])
    size = spec["size"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "lidc"
        for split in SPLITS:  # a clean patient in every split
            image = rng.integers(0, 256, (size, size)).astype(np.uint8)
            (root / split / "images" / "clean").mkdir(parents=True)
            (root / split / "gt" / "clean").mkdir(parents=True)
            (root / split / "images" / "clean" / "z-0_c0.png").write_bytes(png_bytes(image))
            for r in range(4):
                (root / split / "gt" / "clean" / f"z-0_c0_l{r}.png").write_bytes(
                    png_bytes(((image > 60 * (r + 1)) * 255).astype(np.uint8)))
        patient = make_dir(root / "test" / "images", spec["patient"])
        gt = root / "test" / "gt" / patient.name
        gt.mkdir(parents=True, exist_ok=True)
        image_path = patient / spec["image_name"]
        image_path.write_bytes(render_png(*spec["image"], rng))
        stem = image_path.name[: -len(".png")]
        mask_paths = []
        for r, mask in enumerate(spec["masks"]):
            mask_paths.append(gt / f"{stem}_l{r + spec['raters_from']}.png")
            mask_paths[-1].write_bytes(render_png(*mask, rng, binary=True))
        target = image_path if spec["damaged"] == "image" or not mask_paths else mask_paths[0]
        damaged(target, *spec["damage"])
        names = (patient.name,)
        dm = LIDCDataModule(str(root), format="png", crop=(4, 4), batch_size=2)
        arrays = attempt("png", lambda: dm.arrays, names)
        if arrays is not None:
            check_datasets("png", dm, names, 1, (4, 4))


# ---------------------------------------------------------------------------------------------
# QUBIQ NIfTI case folders

NIFTI_DTYPES = ["uint8", "int16", "int32", "float32", "float64", "complex64", "int8", "uint16", "int64"]


def nifti_bytes(array: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.eye(4))
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=1) if gz else data


def huge_nifti(dims: tuple[int, ...], gz: bool, datatype: int = 16) -> bytes:
    """A NIfTI-1 header declaring ``dims`` (and ``datatype``) over a few bytes of data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    data = bytearray(header.binaryblock) + b"\x00" * 4 + b"\x00" * 64
    dim = [len(dims), *dims] + [1] * (7 - len(dims))
    data[40:56] = struct.pack("<8h", *dim)
    data[70:72] = struct.pack("<h", datatype)
    return gzip.compress(bytes(data)) if gz else bytes(data)


NIFTI_SHAPES = st.one_of(
    st.tuples(st.integers(1, 8), st.integers(1, 8)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 4)),
    hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=5),
)


@st.composite
def nifti_files(draw: st.DrawFn, shape: tuple[int, ...] | None = None, binary: bool = False) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["ok"] * 5 + ["random", "huge"]))
    if kind == "huge":
        dims = draw(st.sampled_from([(32767, 32767, 32767), (30000, 30000), (2, 2, 2, 2, 2, 32767, 32767),
                                     (4, 4, 0), (-3, 4), (8, 8, 3)]))
        return "huge", (dims, draw(st.sampled_from([16, 2, 64, 32, 1536, 2048, 0, 777])))
    if kind == "ok" and shape is not None:
        dtype = np.dtype(draw(st.sampled_from(["uint8", "float32", "int16"])))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        array = (rng.integers(0, 2, shape) if binary else rng.random(shape)).astype(dtype)
        return "array", array
    dtype = np.dtype(draw(st.sampled_from(NIFTI_DTYPES)))
    array = draw(hnp.arrays(dtype, shape if shape is not None and draw(st.booleans()) else NIFTI_SHAPES,
                            elements=elements(dtype)))
    return "array", array


def write_nifti(path: Path, spec: tuple[str, Any], gz: bool) -> None:
    kind, value = spec
    if kind == "huge":
        path.write_bytes(huge_nifti(value[0], gz, value[1]))
        return
    try:
        path.write_bytes(nifti_bytes(value, gz))
    except Exception:  # nibabel cannot write this array: write something it can, of the same shape
        path.write_bytes(nifti_bytes(np.zeros(value.shape, np.float32) if value.size else np.zeros((1, 1)), gz))


QUBIQ_DATASETS = {"brain-growth": ((8, 8), 1), "brain-tumor": ((8, 8, 4), 4), "pancreas": ((8, 8, 3), 1)}


@st.composite
def qubiq_cases(draw: st.DrawFn) -> dict[str, Any]:
    dataset = draw(st.sampled_from(sorted(QUBIQ_DATASETS)))
    shape, _ = QUBIQ_DATASETS[dataset]
    seg_shape = shape[:2] + shape[3:] if dataset == "brain-tumor" else shape
    return {
        "dataset": dataset,
        "image": draw(nifti_files(shape)),
        "segs": draw(st.lists(nifti_files(seg_shape, binary=True), min_size=0, max_size=3)),
        "case": draw(file_stems()),
        "gz": draw(st.booleans()),
        "damage": draw(DAMAGE_ARGS),
        "damaged": draw(st.integers(0, 3)),
        "seg_names": draw(st.sampled_from(["task01_seg{:02d}", "TASK01_SEG{:02d}", "task1_seg{}", "task01_seg{:03d}"])),
    }


@fuzz_settings(100)
@given(spec=qubiq_cases())
def test_qubiq_survives_hostile_case_folders(spec: dict[str, Any]) -> None:
    dataset = spec["dataset"]
    shape, channels = QUBIQ_DATASETS[dataset]
    ext = ".nii.gz" if spec["gz"] else ".nii"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "training_data_v3" / dataset / "Training"
        for name in ("case01", "case02"):  # clean cases
            (base / name).mkdir(parents=True)
            image = rng.random(shape).astype(np.float32)
            (base / name / "image.nii.gz").write_bytes(nifti_bytes(image, True))
            mask = (image[..., 0] if dataset == "brain-tumor" else image) > 0.3
            mask[0, 0] = True  # every slice annotated
            (base / name / "task01_seg01.nii.gz").write_bytes(nifti_bytes(mask.astype(np.uint8), True))
        case = make_dir(base, spec["case"])
        files = [case / f"image{ext}"]
        files += [case / (spec["seg_names"].format(r + 1) + ext) for r in range(len(spec["segs"]))]
        write_nifti(files[0], spec["image"], spec["gz"])
        for path, seg in zip(files[1:], spec["segs"]):
            write_nifti(path, seg, spec["gz"])
        damaged(files[min(spec["damaged"], len(files) - 1)], *spec["damage"])
        names = (case.name,)
        dm = QUBIQDataModule(str(root), dataset=dataset, image_size=8, fractions=(0.34, 0.33, 0.33), batch_size=2)
        arrays = attempt("qubiq", lambda: dm.arrays, names)
        if arrays is not None:
            assert arrays.images.shape[1:] == (channels, 8, 8)
            assert np.isfinite(arrays.images).all()
            check_datasets("qubiq", dm, names, channels, (8, 8), source=str(base.parent))


# ---------------------------------------------------------------------------------------------
# probseg sample's readers (.npy, .png, .nii, .nii.gz)


@st.composite
def sample_inputs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["npy"] * 3 + ["png"] * 2 + ["nii"] * 2 + ["npy-huge", "npy-npz", "npy-object"]))
    suffix = {"npy": ".npy", "png": ".png", "nii": draw(st.sampled_from([".nii", ".nii.gz", ".NII.GZ"]))}.get(
        kind, ".npy")
    if kind == "npy":
        shape = st.one_of(st.sampled_from([(1, 5, 6), (5, 6, 3), (3, 5, 6), (5, 6), (5, 6, 1)]),
                          hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
        content = draw(any_array(FLOATS + INTS + ODD, shape))
    elif kind == "png":
        content = draw(st.sampled_from(["L", "RGB", "I;16", "P", "RGBA"]).map(lambda m: ("ok", (6, 5, m))) | PNG_IMAGES)
    elif kind == "nii":
        content = draw(nifti_files(draw(st.sampled_from([(6, 5), (6, 5, 1), (6, 5, 3), (6, 5, 4)]))))
    elif kind == "npy-huge":
        shape, descr = draw(HUGE_HEADERS)
        content = npy_header(shape, descr, draw(st.sampled_from([(1, 0), (2, 0)]))) + bytes(draw(st.integers(0, 300)))
    else:
        content = None
    return {"kind": kind, "suffix": draw(st.sampled_from([suffix] * 4 + [".bin", ".Npy"])),
            "content": content, "channels": draw(st.sampled_from([1, 1, 3]) | st.integers(1, 4)),
            "slice": draw(st.none() | st.integers(-4, 4)),
            "stem": draw(file_stems()), "damage": draw(DAMAGE_ARGS), "seed": draw(st.integers(0, 2**16))}


@fuzz_settings(250)
@given(spec=sample_inputs())
def test_sample_readers_survive_hostile_files(spec: dict[str, Any]) -> None:
    rng = np.random.default_rng(spec["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), spec["stem"], spec["suffix"])
        kind, content = spec["kind"], spec["content"]
        if kind == "npy":
            with open(path, "wb") as handle:
                np.save(handle, content)
        elif kind == "png":
            path.write_bytes(render_png(*content, rng))
        elif kind == "nii":
            write_nifti(path, content, spec["suffix"].lower().endswith(".gz"))
        elif kind == "npy-huge":
            path.write_bytes(content)
        elif kind == "npy-npz":
            buf = io.BytesIO()
            np.savez(buf, a=np.zeros((4, 4)))
            path.write_bytes(buf.getvalue())
        else:
            path.write_bytes(npy_bytes(np.array([{"x": 1}, None], dtype=object)))
        damaged(path, *spec["damage"])
        args = argparse.Namespace(input=[str(path)], slice=spec["slice"], data_config=None)
        items = attempt("sample", lambda: collect_inputs(args, spec["channels"]), (path.name,))
        if items is not None:
            (item,) = items
            assert item.image.dtype == np.float32 and item.image.ndim == 3
            assert item.image.shape[0] == spec["channels"] and item.image.size > 0
            assert np.isfinite(item.image).all()


# ---------------------------------------------------------------------------------------------
# the pickle reader: hostile content is never unpickled without allow_pickle


@fuzz_settings(30)
@given(stem=file_stems(), content=st.binary(max_size=200), suffix=st.sampled_from([".pickle", ".pkl"]))
def test_pickle_reader_refuses_without_allow_pickle(stem: str, content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), stem, suffix)
        marker = Path(tmp) / "ran"
        path.write_bytes(content + pickle.dumps(Path.touch, protocol=2) if content else
                         b"cos\nsystem\n(S'touch " + os.fsencode(marker) + b"'\ntR.")
        assert attempt("pickle", lambda: read_lidc_pickle([path]), (path.name,)) is None
        with pytest.raises(PermissionError, match="allow_pickle"):
            read_lidc_pickle([path])
        assert not marker.exists()
