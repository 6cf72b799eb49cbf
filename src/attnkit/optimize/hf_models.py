"""Switch every transformers model inside a module tree to attnkit's attention, and say what runs it.

:func:`switch_to_attnkit` calls ``set_attn_implementation`` on each outermost ``PreTrainedModel``
(which passes it on to its sub-models) and sets the backend of each attention module;
:func:`describe_calls` turns one recorded forward (``hf_interface.record_calls``) into the
report's rewrites, skips and backend uses: a module is rewritten only if attnkit served its calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from attnkit.optimize.hf_interface import InterfaceCall, attention_modules, backend_of, implementation_for, register, set_backend
from attnkit.optimize.report import BackendUse
from attnkit.optimize.rewrite import ModuleFilterFn, Rewrite, Skip

__all__ = ["Switch", "switch_to_attnkit", "describe_calls", "backend_uses", "revert"]


@dataclass
class Switch:
    """One transformers model switched to attnkit and the attention modules that now call it."""

    path: str
    model: nn.Module = field(repr=False)
    before: str
    after: str
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    """``{path in the whole tree: attention module}`` that dispatch through the interface (the filter accepted)."""


def _outermost_pretrained(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(path == p or path.startswith(p + ".") if p else True for p, _ in found):
            found.append((path, module))
    return found


def _configs(model: nn.Module) -> list:
    """The configs of ``model`` and of every sub-model in it."""
    from transformers import PreTrainedModel

    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
    return list(configs.values())


def switch_to_attnkit(
    model: nn.Module, *, backend: str, masks: str, module_filter_fn: ModuleFilterFn | None
) -> tuple[list[Switch], list[Skip]]:
    """Set attnkit's attention implementation on every transformers model in ``model`` (in place).

    Returns the switched models and the ones transformers refused, with the reason. Attention
    modules that ``module_filter_fn`` rejects keep transformers' own implementation.
    """
    switches: list[Switch] = []
    skips: list[Skip] = []
    pretrained = _outermost_pretrained(model)
    if pretrained:
        register()
    for path, sub in pretrained:
        before = sub.config._attn_implementation
        after = implementation_for(before, masks)
        try:
            sub.set_attn_implementation(after)
        except Exception as error:  # noqa: BLE001 - transformers' refusal becomes the reason in the report
            skips.append(Skip(path, type(sub).__name__, f"transformers refused attn_implementation={after!r}: {error}"))
            continue
        _switch_submodels(sub, after)
        if sub.config._attn_implementation != after:
            reason = "its attention does not dispatch through transformers' AttentionInterface (set_attn_implementation had no effect)"
            skips.append(Skip(path, type(sub).__name__, reason))
            continue
        switch = Switch(path, sub, before, after)
        prefix = f"{path}." if path else ""
        for name, module in attention_modules(sub, _configs(sub)).items():
            full = prefix + name
            if module_filter_fn is not None and not module_filter_fn(module, full):
                set_backend(module, None)
                skips.append(Skip(full, type(module).__name__, "module_filter_fn returned False"))
            else:
                set_backend(module, backend)
                switch.modules[full] = module
        switches.append(switch)
    return switches, skips


def _switch_submodels(model: nn.Module, implementation: str) -> None:
    """Switch sub-models whose own config ``set_attn_implementation`` did not reach (T5's stacks in transformers 5.17)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != implementation:
            try:
                module.set_attn_implementation(implementation)
            except Exception:  # noqa: BLE001 - what still runs transformers' code shows up in the probe as a skip
                pass


def revert(switches: list[Switch]) -> None:
    """Give every switched model its attention implementation back."""
    for switch in switches:
        switch.model.set_attn_implementation(switch.before)


def describe_calls(model: nn.Module, switches: list[Switch], calls: list[InterfaceCall] | None) -> tuple[list[Rewrite], list[Skip]]:
    """Rewrites and skips of the switched models, from the calls one forward made (None: not run).

    A module is rewritten when attnkit served at least one of its calls (or, without a run, when
    it dispatches through the interface); one whose every call fell back is a skip with the reason.
    """
    paths = {id(module): path for path, module in model.named_modules()}
    by_module: dict[int, list[InterfaceCall]] = {}
    for call in calls or ():
        by_module.setdefault(id(call.module), []).append(call)
    rewrites: list[Rewrite] = []
    skips: list[Skip] = []
    for switch in switches:
        change = f"attn_implementation {switch.before!r} -> {switch.after!r}"
        modules = dict(switch.modules)
        # Modules that called the interface but were not found from their source (module_filter_fn's rejects are skips already).
        modules.update({
            paths[i]: c[0].module for i, c in by_module.items()
            if _inside(paths.get(i), switch.path) and backend_of(c[0].module) is not None
        })  # fmt: skip
        for path, module in modules.items():
            name = type(module).__name__
            own = by_module.get(id(module), [])
            served = [c for c in own if c.ran == "attnkit"]
            fell_back = [c for c in own if c.ran != "attnkit"]
            if calls is None:
                rewrites.append(Rewrite(path, name, f"{name} on attnkit", "transformers", f"{change}; not run (no example inputs)"))
            elif own and not served:
                skips.append(Skip(path, name, f"every call ran transformers' {fell_back[0].ran}: {fell_back[0].why}"))
            elif not own:
                skips.append(Skip(path, name, f"{change}, but it never called attnkit on the example inputs (its config was not switched, or it did not run)"))
            else:
                detail = change
                if fell_back:
                    detail += f"; {len(fell_back)} of {len(own)} calls ran transformers' {fell_back[0].ran} ({fell_back[0].why})"
                rewrites.append(Rewrite(path, name, f"{name} on attnkit", "transformers", detail))
    return rewrites, skips


def _inside(path: str | None, root: str) -> bool:
    return path is not None and (root == "" or path == root or path.startswith(root + "."))


def backend_uses(model: nn.Module, calls: list[InterfaceCall]) -> list[BackendUse]:
    """What each recorded call ran on (one entry per call)."""
    paths = {id(module): path for path, module in model.named_modules()}
    return [BackendUse(paths.get(id(c.module), type(c.module).__name__), c.backend, c.why, c.rejected, c.shape) for c in calls]
