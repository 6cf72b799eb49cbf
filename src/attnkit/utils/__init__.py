"""Small shared utilities: the one module swap, the one dtype parser, a model's dtype and device, the one pytree cast, the one table renderer."""

from attnkit.utils.dtypes import dtype_name, parse_dtype
from attnkit.utils.modules import model_device, model_dtype
from attnkit.utils.swap import ModuleFilterFn, swap_modules
from attnkit.utils.tables import Table, html_table, markdown_table, rich_table
from attnkit.utils.trees import cast_floating

__all__ = [
    # module swap
    "ModuleFilterFn", "swap_modules",
    # dtypes
    "parse_dtype", "dtype_name",
    # what a model's tensors say
    "model_dtype", "model_device",
    # pytrees
    "cast_floating",
    # (title, header, rows) tables
    "Table", "markdown_table", "html_table", "rich_table",
]
