"""Reading a pickle without trusting it: the EDFM reference's teacher pickles hold dicts, flax
FrozenDicts, numpy arrays and jax 0.4 arrays, and pickles run code while they load. The
Unpickler here resolves only the globals those files need: flax's FrozenDict (read as a dict),
numpy's array, dtype and scalar reconstruction (pickle protocols 0 to 5), and jax 0.4's
`jax._src.array._reconstruct_array`, whose numpy arguments are rebuilt here without importing
jax's function (current jax rejects the `named_shape` it was pickled with). Any other global,
and any object or structured array, is refused in one line.
"""
import pickle

import numpy as np

from utils.errors import UserError, first_line


class _Refused(Exception):
    """Something a pickle asks to build that this reader does not build (named in the message)."""


class _NdarrayType:
    """What the pickle's `numpy.ndarray` resolves to: only ever an argument of `_ndarray`."""


def _numeric(dtype: np.dtype) -> np.dtype:
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"a numpy array of dtype {dtype}")
    return dtype


def _dtype(spec, align=False, copy=False):
    """numpy.dtype, numeric ones only (no object or structured dtypes)."""
    return _numeric(np.dtype(spec, bool(align), bool(copy)))


def _ndarray(subtype, shape=None, dtype_code=None):
    """numpy's `_reconstruct`: an empty array, which the pickle's state then fills."""
    if subtype is not _NdarrayType:
        raise _Refused("an array of a type other than numpy.ndarray")
    return np.ndarray((0,), np.int8)


def _frombuffer(buffer, dtype, shape, order="C"):
    """numpy's `_frombuffer` (how protocol-5 pickles spell arrays): a copy of the pickled bytes."""
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or order not in "CF":
        raise _Refused("a malformed numpy array")
    return np.frombuffer(buffer, _numeric(dtype)).reshape(shape, order=order).copy()


def _scalar(dtype, data=None):
    """numpy's `scalar(dtype, bytes)`: a numpy scalar such as the SWAG step counters."""
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != _numeric(dtype).itemsize:
        raise _Refused("a malformed numpy scalar")
    return np.frombuffer(data, dtype)[0]


def _jax_array(rebuild, args, array_state, aval_state=None):
    """jax 0.4's `_reconstruct_array(fun, args, arr_state, aval_state)`, as the numpy array it
    wraps: `fun(*args)` filled by `arr_state`. aval_state (the weak type and the `named_shape`
    that current jax rejects) describes the device array, not the values, and is dropped."""
    if rebuild is not _ndarray or not isinstance(args, tuple):
        raise _Refused("a jax array not made from a numpy array")
    array = rebuild(*args)
    array.__setstate__(array_state)
    return array


def _latin1(text, encoding="latin1"):
    """`_codecs.encode(str, 'latin1')`: how protocol-2 pickles spell bytes (array data)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused("a _codecs.encode call other than latin1 bytes")
    return text.encode("latin1")


class _FrozenDict(dict):
    """flax's FrozenDict (pickled as FrozenDict(plain dict)), read as a dict."""

    def __setstate__(self, state):  # a FrozenDict pickled through its slots (_dict, _hash)
        slots = state[1] if isinstance(state, tuple) and len(state) == 2 else state
        inner = slots.get("_dict") if isinstance(slots, dict) else None
        if not isinstance(inner, dict):
            raise _Refused("a malformed flax FrozenDict")
        self.update(inner)


# (module, name) in the pickle -> what it is read as. numpy 1.x spells numpy._core numpy.core.
_ALLOWED = {
    ("flax.core.frozen_dict", "FrozenDict"): _FrozenDict,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("_codecs", "encode"): _latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED`; any other is refused (_Refused)."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"the global {module}.{name}") from None


def _plain(obj):
    """Dicts (FrozenDicts included) as plain dicts, all the way down."""
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    return obj


def load_pickle(path: str):
    """The object in a reference pickle, read without trusting its globals (RestrictedUnpickler)."""
    try:
        with open(path, "rb") as f:
            return _plain(RestrictedUnpickler(f).load())
    except _Refused as refused:
        raise UserError(f"{path}: refused to unpickle {refused}; only dicts, flax FrozenDicts, numpy arrays "
                        f"and jax 0.4 arrays are read (anything else could run code from the file)") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    except Exception as error:  # truncated or not a pickle: many types
        raise UserError(f"{path} is not a readable pickle: {first_line(error)}") from None
