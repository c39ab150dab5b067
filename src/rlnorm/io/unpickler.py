"""A restricted unpickler: numpy array data and inert stand-ins, nothing that runs code.

Unpickling an ordinary pickle imports and calls whatever globals the file names. The
unpickler here imports nothing the file asks for: it hands out numpy's array
reconstruction (``ndarray``, ``dtype``, scalars, latin-1 bytes of protocol-2 pickles) and
``OrderedDict``, maps the classes an :class:`AllowList` names to inert stand-ins that only
keep the attributes they are given, and refuses every other global with
:class:`UnsafePickleError` before anything runs. It knows no file format; the readers of
formats (:mod:`rlnorm.io.sb3`) give it their allow-list.

Example:
    >>> import pickle, tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from rlnorm.io.unpickler import AllowList, unpickle
    >>> path = Path(tempfile.mkdtemp()) / "stats.pkl"
    >>> _ = path.write_bytes(pickle.dumps({"mean": np.zeros(2)}))
    >>> unpickle(path, where="stats.pkl", allow=AllowList("no objects", "`pickle.dump()`"))
    {'mean': array([0., 0.])}
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

__all__ = [
    "NUMPY_RANDOM_MODULES",
    "AllowList",
    "Inert",
    "PickleFileWarning",
    "UnsafePickleError",
    "is_stand_in",
    "origin_of",
    "stand_in",
    "unpickle",
]

#: Modules of numpy's random generators, pickled inside seeded objects (e.g. Gymnasium spaces).
NUMPY_RANDOM_MODULES = frozenset(
    {
        "numpy.random._pickle",
        "numpy.random._pcg64",
        "numpy.random._mt19937",
        "numpy.random._philox",
        "numpy.random._sfc64",
        "numpy.random.bit_generator",
        "numpy.random.mtrand",
    }
)


class PickleFileWarning(UserWarning):
    """Emitted when statistics are read from a pickle file (Stable-Baselines3's format).

    Silence it with ``warnings.filterwarnings("ignore", category=PickleFileWarning)``.

    Example:
        >>> import warnings
        >>> from rlnorm.io.unpickler import PickleFileWarning
        >>> warnings.filterwarnings("ignore", category=PickleFileWarning)
    """


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle references a global that rlnorm's restricted unpickler refuses to load.

    Example:
        >>> from rlnorm.io.unpickler import UnsafePickleError
        >>> issubclass(UnsafePickleError, ValueError)
        True
    """


@dataclasses.dataclass(frozen=True)
class AllowList:
    """The globals of one file format that :func:`unpickle` replaces with inert stand-ins.

    Numpy array data is always accepted and needs no entry.

    Args:
        what: what the stand-ins are, for the refusal message ("... neither numpy array data
            nor {what}").
        writer: what writes the format, for error messages ("not a pickle written by
            {writer}").
        classes: dotted names (``module.name``) of single classes.
        modules: modules all of whose globals are accepted.
        packages: names accepted in any module under a package: ``{package: names}``.

    Example:
        >>> from rlnorm.io.unpickler import AllowList
        >>> allow = AllowList("shapes", "`save()`", packages={"shapes": frozenset({"Box"})})
        >>> allow.accepts("shapes.box", "Box"), allow.accepts("shapes.box", "Ball")
        (True, False)
    """

    what: str
    writer: str
    classes: frozenset[str] = frozenset()
    modules: frozenset[str] = frozenset()
    packages: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def accepts(self, module: str, name: str) -> bool:
        """Whether ``module.name`` becomes an inert stand-in."""
        if f"{module}.{name}" in self.classes or module in self.modules:
            return True
        return any(
            module.startswith(package + ".") and name in names
            for package, names in self.packages.items()
        )


class Inert:
    """Stand-in for a pickled object: keeps the state it is given and runs nothing.

    Each class an :class:`AllowList` accepts maps to a subclass of this one (made by
    :func:`stand_in`) that records the original dotted name in ``_rlnorm_origin``.

    Example:
        >>> from rlnorm.io.unpickler import stand_in
        >>> obj = stand_in("pkg.mod.Thing")()
        >>> obj.__setstate__({"mean": 0.0})
        >>> obj.mean, obj
        (0.0, <inert stand-in for pkg.mod.Thing>)
    """

    _rlnorm_origin: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        """An empty stand-in; the arguments the pickle passes are ignored."""
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if isinstance(part, dict):
                self.__dict__.update({str(k): v for k, v in part.items()})
            elif part is not None:
                self.__dict__["_rlnorm_state"] = part

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._rlnorm_origin}>"


_STAND_INS: dict[str, type[Inert]] = {}


def stand_in(origin: str) -> type[Inert]:
    """The inert class standing in for the class with dotted name ``origin`` (one per name).

    Example:
        >>> from rlnorm.io.unpickler import stand_in
        >>> cls = stand_in("pkg.mod.Thing")
        >>> cls.__name__, cls is stand_in("pkg.mod.Thing")
        ('InertThing', True)
    """
    cls = _STAND_INS.get(origin)
    if cls is None:
        name = "Inert" + origin.rsplit(".", 1)[-1].strip("_").replace("_", "")
        cls = type(name, (Inert,), {"_rlnorm_origin": origin, "__module__": __name__})
        _STAND_INS[origin] = cls
    return cls


def is_stand_in(obj: Any, origin: str) -> bool:
    """Whether ``obj`` is an inert stand-in for the class with dotted name ``origin``.

    Example:
        >>> from rlnorm.io.unpickler import is_stand_in, stand_in
        >>> is_stand_in(stand_in("pkg.Thing")(), "pkg.Thing"), is_stand_in({}, "pkg.Thing")
        (True, False)
    """
    return isinstance(obj, Inert) and obj._rlnorm_origin == origin


def origin_of(obj: Any) -> str:
    """What ``obj`` is, for messages: a stand-in's dotted origin, or the type's name.

    Example:
        >>> from rlnorm.io.unpickler import origin_of, stand_in
        >>> origin_of(stand_in("pkg.Thing")()), origin_of({})
        ('pkg.Thing', 'dict')
    """
    if isinstance(obj, Inert):
        return obj._rlnorm_origin
    return type(obj).__name__


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1 text."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(
            "`_codecs.encode` is accepted only the way protocol-2 pickles encode bytes "
            f"(latin-1 text), got encoding {encoding!r}"
        )
    return text.encode("latin1")


@functools.cache
def _numpy_globals() -> dict[str, Any]:
    """The numpy callables array pickles need, under both numpy 1 and numpy 2 names."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        out[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        out[f"{package}.multiarray.scalar"] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 array pickles
            out[f"{package}.numeric._frombuffer"] = numeric._frombuffer
    out["collections.OrderedDict"] = OrderedDict
    out["_codecs.encode"] = _latin1_bytes  # bytes inside protocol-2 pickles
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and inert stand-ins; refuses every other global."""

    def __init__(self, file: BinaryIO, where: str, allow: AllowList) -> None:
        super().__init__(file)
        self._where = where
        self._allow = allow

    def find_class(self, module: str, name: str) -> Any:
        real = _numpy_globals().get(f"{module}.{name}")
        if real is not None:
            return real
        if self._allow.accepts(module, name):
            return stand_in(f"{module}.{name}")
        raise UnsafePickleError(
            f"Refused to load {self._where}: it references the global `{module}.{name}`, "
            f"which is neither numpy array data nor {self._allow.what}. rlnorm's restricted "
            "unpickler imports nothing else and ran no code from the file."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            f"it uses pickle persistent IDs, which {self._allow.writer} never writes"
        )


def unpickle(path: str | os.PathLike[str], *, where: str, allow: AllowList) -> Any:
    """Read the pickle at ``path`` with the restricted unpickler; no code from it runs.

    Args:
        path: the pickle file.
        where: the file as error messages name it, e.g. ``"SB3 file 'vec.pkl'"``.
        allow: the classes to rebuild as inert stand-ins, besides numpy array data.

    Returns:
        The unpickled object: plain containers, numpy values and :class:`Inert` stand-ins.

    Raises:
        UnsafePickleError: the pickle references a global ``allow`` does not accept.
        ValueError: the file is empty, truncated or not a pickle; the message names it.

    Example:
        >>> from rlnorm.io.unpickler import AllowList, unpickle
        >>> allow = AllowList("my objects", "`save()`", classes=frozenset({"my.Obj"}))
        >>> obj = unpickle("state.pkl", where="state file", allow=allow)  # doctest: +SKIP
    """
    with Path(path).open("rb") as file:
        if not file.read(1):
            raise ValueError(f"Cannot read {where}: the file is empty.")
        file.seek(0)
        try:
            return _RestrictedUnpickler(file, where, allow).load()
        except UnsafePickleError:
            raise
        except EOFError:
            raise ValueError(
                f"Cannot read {where}: it is truncated (the pickle ends before its last "
                "object is complete)."
            ) from None
        except Exception as err:  # malformed pickles raise many types (KeyError, ...)
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"Cannot read {where}: it is not a pickle written by {allow.writer} "
                f"({type(err).__name__}{': ' + detail if detail else ''})."
            ) from None
