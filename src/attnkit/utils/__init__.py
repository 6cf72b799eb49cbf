"""Small shared utilities: the one module swap."""

from attnkit.utils.swap import ModuleFilterFn, swap_modules

__all__ = ["ModuleFilterFn", "swap_modules"]
