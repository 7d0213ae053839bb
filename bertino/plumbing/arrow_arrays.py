"""Reading Arrow arrays as the checks and the hashes need them: type tests, the j-th item of every list, numpy views.

Read from the arrays' buffers where pyarrow's own conversions (`to_numpy`, `pa.array`, a Python scalar in a compute
call) would import pandas: ~0.3 s at the start of every run, however small its data.
"""

from __future__ import annotations

import numpy as np


def to_numpy(array, fill=0) -> np.ndarray:
    """A boolean or numeric Arrow Array (one chunk) as a numpy array, nulls → `fill`. Read from its buffers:
    pyarrow's own `to_numpy` imports pandas, ~0.3 s at the start of every run, however small."""
    import pyarrow as pa

    n, offset = len(array), array.offset
    if pa.types.is_null(array.type):
        return np.full(n, fill)
    validity, data = array.buffers()[:2]
    if pa.types.is_boolean(array.type):
        values = np.unpackbits(np.frombuffer(data, np.uint8), count=offset + n, bitorder="little")[offset:]
        values = values.astype(bool)
    else:
        values = np.frombuffer(data, dtype=array.type.to_pandas_dtype())[offset:offset + n]
    if array.null_count:
        valid = np.unpackbits(np.frombuffer(validity, np.uint8), count=offset + n, bitorder="little")[offset:]
        values = np.where(valid.astype(bool), values, fill)
    return values


def is_text_type(type_) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def is_list_of_texts(type_) -> bool:
    import pyarrow as pa

    return ((pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_))
            and is_text_type(type_.value_type))


def list_item(array, j: int):
    """Item j of every list of a list<string> Array (one chunk) → a string Array, null where a list is null or
    has no item j."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_fixed_size_list(array.type):
        array = array.cast(pa.list_(array.type.value_type))
    lengths = to_numpy(pc.list_value_length(array), 0)  # (n,)
    starts = to_numpy(array.offsets)[:-1].astype(np.int64) + j  # (n,) absolute positions in array.values
    has = lengths > j
    index = pa.Array.from_buffers(pa.int64(), len(array), [  # built from buffers: pa.array would import pandas
        None if has.all() else pa.py_buffer(np.packbits(has, bitorder="little")),
        pa.py_buffer(np.where(has, starts, 0))], null_count=int((~has).sum()))
    return array.values.take(index)
