"""Small shared utilities: the one module swap, the one dtype parser, the one pytree cast."""

from attnkit.utils.dtypes import dtype_name, parse_dtype
from attnkit.utils.swap import ModuleFilterFn, swap_modules
from attnkit.utils.trees import cast_floating

__all__ = [
    # module swap
    "ModuleFilterFn", "swap_modules",
    # dtypes
    "parse_dtype", "dtype_name",
    # pytrees
    "cast_floating",
]
