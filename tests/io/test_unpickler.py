"""The restricted unpickler: numpy data and inert stand-ins from an allow-list, nothing else."""

from __future__ import annotations

import os
import pickle
import pickletools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlnorm.io import unpickler
from rlnorm.io.unpickler import (
    NUMPY_RANDOM_MODULES,
    AllowList,
    Inert,
    UnsafePickleError,
    is_stand_in,
    origin_of,
    unpickle,
)

NOTHING = AllowList(what="no objects", writer="`the test`")


class Point:
    """Pickled by reference as ``test_unpickler.Point``; unpickled only as a stand-in."""

    def __init__(self, x: float) -> None:
        self.x = x


class SlottedPoint:
    __slots__ = ("x",)

    def __init__(self, x: float) -> None:
        self.x = x


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def write(tmp_path: Path, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def allowing(*classes: type) -> AllowList:
    names = frozenset(f"{c.__module__}.{c.__qualname__}" for c in classes)
    return AllowList(what="test objects", writer="`the test`", classes=names)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_scalars_bytes_and_plain_containers_come_back_equal(
    tmp_path: Path, protocol: int
) -> None:
    data = {
        "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.float64(3.5),
        "keys": OrderedDict(a=[1, 2.0, "x"], b=(None, True)),
        "raw": b"\x00\xff bytes",
    }
    out = unpickle(write(tmp_path, data, protocol), where="file", allow=NOTHING)
    np.testing.assert_array_equal(out["mean"], data["mean"])
    assert out["mean"].dtype == np.float32
    assert out["count"] == 3.5
    assert isinstance(out["count"], np.float64)
    assert out["keys"] == data["keys"]
    assert out["raw"] == data["raw"]


def test_allowed_classes_come_back_as_inert_stand_ins_with_their_state(tmp_path: Path) -> None:
    path = write(tmp_path, [Point(1.5), SlottedPoint(2.5)])
    point, slotted = unpickle(path, where="file", allow=allowing(Point, SlottedPoint))
    assert not isinstance(point, Point)
    assert isinstance(point, Inert)
    assert is_stand_in(point, f"{__name__}.Point")
    assert point.x == 1.5
    assert slotted.x == 2.5  # state given as (None, {slot: value})
    assert origin_of(point) == f"{__name__}.Point"
    assert repr(point) == f"<inert stand-in for {__name__}.Point>"
    assert type(point) is type(unpickle(path, where="file", allow=allowing(Point, SlottedPoint))[0])


def test_stand_in_state_that_is_not_a_dict_is_kept_aside() -> None:
    obj = unpickler.stand_in("pkg.Thing")()
    obj.__setstate__([1, 2])
    assert obj._rlnorm_state == [1, 2]


def test_every_other_global_is_refused_and_named(tmp_path: Path) -> None:
    path = write(tmp_path, [Point(1.0)])
    with pytest.raises(UnsafePickleError, match=r"references the global `test_unpickler.Point`"):
        unpickle(path, where="my file", allow=NOTHING)
    with pytest.raises(UnsafePickleError, match=r"Refused to load my file.*nor test objects"):
        unpickle(write(tmp_path, print), where="my file", allow=allowing(Point))


def test_an_allowed_callable_is_a_stand_in_too_so_a_reduce_payload_never_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, _RunsCommand(f"touch {marker}"))
    origin = f"{os.system.__module__}.system"
    allow = AllowList(what="x", writer="x", modules=frozenset({os.system.__module__}))
    out = unpickle(path, where="file", allow=allow)  # "calling" the stand-in makes one
    assert is_stand_in(out, origin)
    assert not marker.exists()


def test_allow_list_matches_classes_modules_and_names_under_packages() -> None:
    allow = AllowList(
        what="x",
        writer="x",
        classes=frozenset({"pkg.mod.Exact"}),
        modules=NUMPY_RANDOM_MODULES,
        packages={"spaces": frozenset({"Box"})},
    )
    assert allow.accepts("pkg.mod", "Exact")
    assert not allow.accepts("pkg.mod", "Other")
    assert allow.accepts("numpy.random._pcg64", "PCG64")
    assert allow.accepts("spaces.box", "Box")
    assert allow.accepts("spaces.a.b", "Box")
    assert not allow.accepts("spaces", "Box")  # only modules under the package
    assert not allow.accepts("spacesx.box", "Box")
    assert not allow.accepts("spaces.box", "Ball")


def test_seeded_numpy_generator_loads_as_a_stand_in_when_its_modules_are_allowed(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, {"rng": np.random.default_rng(0)})
    allow = AllowList(what="x", writer="x", modules=NUMPY_RANDOM_MODULES)
    out = unpickle(path, where="file", allow=allow)
    assert isinstance(out["rng"], Inert)


def test_codecs_encode_is_accepted_only_for_latin1_bytes(tmp_path: Path) -> None:
    ops = [op.name for op, *_ in pickletools.genops(pickle.dumps(b"ab", protocol=2))]
    assert "GLOBAL" in ops  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x02\x00\x00\x00abX\x05\x00\x00\x00utf-8\x86R."
    path = tmp_path / "codec.pkl"
    path.write_bytes(evil)
    with pytest.raises(ValueError, match=r"only the way protocol-2 pickles encode bytes"):
        unpickle(path, where="file", allow=NOTHING)


def test_persistent_ids_are_refused_naming_the_writer(tmp_path: Path) -> None:
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "id" if isinstance(obj, str) else None

    path = tmp_path / "ids.pkl"
    with path.open("wb") as f:
        WithIds(f).dump(["x"])
    with pytest.raises(ValueError, match=r"persistent IDs, which `the test` never writes"):
        unpickle(path, where="file", allow=NOTHING)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"Cannot read my file: the file is empty"),
        (pickle.dumps(list(range(50)), protocol=2)[:-20], r"Cannot read my file: it is truncated"),
        (b"not a pickle", r"Cannot read my file: it is not a pickle written by `the test`"),
    ],
    ids=["empty", "truncated", "not a pickle"],
)
def test_unreadable_files_name_the_file_and_the_problem(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        unpickle(path, where="my file", allow=NOTHING)
    assert not isinstance(info.value, UnsafePickleError)


def test_the_module_knows_no_file_format() -> None:
    source = Path(unpickler.__file__).read_text()
    for name in ("stable_baselines3", "VecNormalize", "gymnasium"):
        assert name not in source, name
