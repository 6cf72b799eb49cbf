"""The training-step helper: skip steps whose gradients are not finite and count FP8 overflow events.

FP8 layers propagate overflow (an inf/NaN operand gives a NaN scale, hence non-finite output and
gradients) instead of hiding it behind saturation, so one finiteness check of the gradients after
``backward`` catches every overflow. On a bad step the helper drops the gradients, does not step the
optimizer, and backs the delayed scales off (their amax history is cleared, so the next step
re-derives every scale from current amaxes instead of a stale, too-large scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit.errors import check_type
from attnkit.fp8.fused import Float8FusedLinear
from attnkit.fp8.linear import Float8Linear

__all__ = ["Float8StepStats", "Float8TrainStep"]


@dataclass
class Float8StepStats:
    """Counters of a :class:`Float8TrainStep` (kept in its ``state_dict``)."""

    steps: int = 0
    """Optimizer steps taken."""
    skipped: int = 0
    """Steps skipped because a gradient was inf/NaN."""
    overflow_x: int = 0
    """Forward calls, over all FP8 layers, whose input amax was inf/NaN (read at the last step)."""
    overflow_weight: int = 0
    """Forward calls whose weight amax was inf/NaN."""
    overflow_grad: int = 0
    """Backward calls whose output-gradient amax was inf/NaN."""


class Float8TrainStep:
    """Call after ``loss.backward()`` instead of ``optimizer.step()``.

    Example:
        >>> step = Float8TrainStep(model, optimizer)
        >>> loss.backward(); took = step()     # False: step skipped (non-finite gradients)
        >>> step.stats.skipped
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        check_type(model, nn.Module, "model")
        check_type(optimizer, torch.optim.Optimizer, "optimizer")
        self.model, self.optimizer, self.stats = model, optimizer, Float8StepStats()

    def __call__(self) -> bool:
        """Step the optimizer if every gradient is finite; returns whether it stepped. One host sync."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        layers = [m for m in self.model.modules() if isinstance(m, (Float8Linear, Float8FusedLinear))]
        if layers:
            x, w, g = torch.stack([m.fp8_overflow_counts for m in layers]).sum(0).tolist()
            self.stats.overflow_x, self.stats.overflow_weight, self.stats.overflow_grad = x, w, g
        if finite:
            self.optimizer.step()
            self.stats.steps += 1
        else:
            self.stats.skipped += 1
            for layer in layers:
                layer.reset_amax_history()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self) -> dict:
        """The counters (the scales' state lives in the model's ``state_dict``)."""
        return dict(vars(self.stats))

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        self.stats = Float8StepStats(**state)
