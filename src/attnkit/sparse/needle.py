"""A synthetic needle-retrieval probe: does a sparsity pattern keep the one block that matters?

Each trial is one attention problem ``(H, S, D)`` built so that dense causal attention retrieves:

* keys and values are noise ``N(0, 1)``, except a *needle*: ``needle_len`` consecutive keys at a
  random position in ``[S/8, S/2)`` that share a direction ``u`` (``k = sqrt(D) u + noise``) and carry
  one payload value ``codebook[id]`` (``id`` random among ``vocab``);
* the last ``block_size`` queries are the *question*: ``q = sqrt(D) u + noise``, so each needle key
  scores about ``sqrt(D)`` nats above the noise (8 at ``D = 64``), all other queries are noise.

The answer is read from the question rows' mean output: the codebook entry with the largest dot
product. Dense attention answers correctly; a pattern answers only if it computes the needle's
block(s) for the question's block. Per pattern: accuracy over trials, attention-mass recall
(dense probability of the question rows inside the computed mask), output relative L2 vs dense on
the question rows, and block density.

Example::

    result = needle_retrieval(ContentAware(block_size=64, density=0.1), seq_len=4096)
    result.accuracy, result.recall, result.density
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attnkit.ops import attention
from attnkit.sparse.attention import sparse_attention
from attnkit.sparse.patterns import Pattern, check_count
from attnkit.sparse.topk import ContentAware, select_blocks

__all__ = ["NeedleTask", "NeedleResult", "needle_task", "needle_retrieval"]


@dataclass(frozen=True, eq=False)
class NeedleTask:
    """``trials`` problems stacked on the batch dimension."""

    q: torch.Tensor
    """``(trials, H, S, D)``."""
    k: torch.Tensor
    v: torch.Tensor
    codebook: torch.Tensor
    """``(trials, vocab, D)``: the payloads one trial's answer is chosen from."""
    answer: torch.Tensor
    """``(trials,)`` int64: the needle's payload id."""
    position: torch.Tensor
    """``(trials,)`` int64: the needle's first key."""
    question: int
    """Question rows: the last ``question`` queries."""


@dataclass(frozen=True)
class NeedleResult:
    pattern: str
    density: float
    """Fraction of all block pairs computed (mean over trials and heads for content-aware)."""
    accuracy: float
    """Fraction of trials answered correctly."""
    dense_accuracy: float
    """The same for dense causal attention on the same trials (the task's ceiling)."""
    recall: float
    """Mean dense attention probability of the question rows inside the computed mask."""
    rel_l2: float
    """``||out - dense|| / ||dense||`` over the question rows."""

    def to_json(self) -> dict:
        return asdict(self)


def needle_task(seq_len: int = 4096, *, trials: int = 8, heads: int = 2, head_dim: int = 64, needle_len: int = 16,
                vocab: int = 64, block_size: int = 64, seed: int = 0) -> NeedleTask:  # fmt: skip
    """Build the problems (see the module docstring); float32 on CPU."""
    for name, value in (("seq_len", seq_len), ("trials", trials), ("heads", heads), ("head_dim", head_dim),
                        ("needle_len", needle_len), ("vocab", vocab), ("block_size", block_size)):  # fmt: skip
        check_count(value, name)
    gen = torch.Generator().manual_seed(seed)
    shape = (trials, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    u = torch.nn.functional.normalize(torch.randn(trials, heads, 1, head_dim, generator=gen), dim=-1) * head_dim**0.5
    codebook = torch.randn(trials, vocab, head_dim, generator=gen)
    answer = torch.randint(vocab, (trials,), generator=gen)
    position = torch.randint(seq_len // 8, seq_len // 2, (trials,), generator=gen)
    for t in range(trials):
        span = slice(int(position[t]), int(position[t]) + needle_len)
        k[t, :, span] += u[t]
        v[t, :, span] = codebook[t, answer[t]]
    q[:, :, -block_size:] += u
    return NeedleTask(q, k, v, codebook, answer, position, block_size)


def _allowed_question_rows(task: NeedleTask, pattern) -> tuple[torch.Tensor, float]:
    """``(trials|1, H|1, question, S)`` bool mask of the question rows, and the pattern's block density."""
    seq = task.k.shape[2]
    if isinstance(pattern, ContentAware):
        selection = select_blocks(task.q, task.k, pattern)
        block = pattern.block_size
        rows = selection.blocks[:, :, -1:].repeat_interleave(block, -1)[..., :seq]  # (B, H, 1, S)
        allowed = rows & pattern.base.to_dense(seq)[-task.question :]
        return allowed, selection.density
    return pattern.to_dense(seq)[-task.question :][None, None], pattern.density(seq, block_size=task.question)


def _accuracy(task: NeedleTask, out: torch.Tensor) -> float:
    """Fraction of trials whose question output ``(trials, H, question, D)`` is nearest its payload."""
    read = out.mean(dim=(1, 2))  # (trials, D): averaged over heads and question rows
    guess = (task.codebook @ read[:, :, None]).squeeze(-1).argmax(-1)
    return float((guess == task.answer).float().mean())


def needle_retrieval(pattern: Pattern | ContentAware, task: NeedleTask | None = None, **task_options) -> NeedleResult:
    """Score ``pattern`` on ``task`` (default: :func:`needle_task` with ``task_options``).

    Static patterns are laid out in blocks of ``task.question`` tokens (the task's block size).
    """
    task = task or needle_task(**task_options)
    rows = slice(-task.question, None)
    dense = attention(task.q, task.k, task.v, causal=True)[:, :, rows]
    out = sparse_attention(task.q, task.k, task.v, pattern, block_size=task.question)[:, :, rows]
    scores = (task.q[:, :, rows] @ task.k.transpose(-1, -2)) * task.q.shape[-1] ** -0.5
    causal = torch.ones(task.question, task.k.shape[2], dtype=torch.bool).tril(task.k.shape[2] - task.question)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # dense, question rows only
    allowed, density = _allowed_question_rows(task, pattern)
    return NeedleResult(
        pattern=repr(pattern),
        density=float(density),
        accuracy=_accuracy(task, out),
        dense_accuracy=_accuracy(task, dense),
        recall=float((probs * allowed).sum(-1).mean()),
        rel_l2=float((out - dense).norm() / dense.norm()),
    )
