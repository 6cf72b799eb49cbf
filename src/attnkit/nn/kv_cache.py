"""`KVCache`: the projected keys and values one attention layer has seen, for decoding and streaming."""

from __future__ import annotations

import torch

from attnkit.errors import check_arg

__all__ = ["KVCache"]


class KVCache:
    """Keys ``(B, Hkv, S, D)``, values ``(B, Hkv, S, Dv)`` and key keep-mask ``(B, S)`` of past positions.

    One cache per layer. Pass it to :meth:`MultiHeadAttention.forward` as ``kv_cache=``: each call
    appends its new keys and values and attends over all of them. With ``is_causal=True`` the
    new queries are the *last* ``Sq`` positions (bottom-right alignment), so a prefill followed
    by decode steps, or any split of a sequence into chunks, gives the outputs of one call on the
    whole sequence. Grows by concatenation, so gradients flow through cached entries.

    ``key_keep`` is True where a key may be attended (the negation of the ``key_padding_mask``
    given with it), or None while every cached key may be attended.

    Meant for self-attention, whose keys grow with the sequence; cross-attention over a fixed
    memory needs no cache (pass the memory each call).

    Example::

        cache = KVCache()
        out, _ = mha(prompt, need_weights=False, is_causal=True, kv_cache=cache)     # prefill
        for _ in range(steps):
            out, _ = mha(out[:, -1:], need_weights=False, is_causal=True, kv_cache=cache)  # decode
    """

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.key_keep: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Number of cached positions (0 when empty)."""
        return 0 if self.key is None else self.key.shape[2]

    def reset(self) -> None:
        """Forget every cached position."""
        self.key = self.value = self.key_keep = None

    def update(
        self, key: torch.Tensor, value: torch.Tensor, key_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append ``key (B, Hkv, S, D)``, ``value (B, Hkv, S, Dv)`` and bool ``key_keep (B, S)``; return all positions."""
        if self.key is not None:
            for name, new, old in (("key", key, self.key), ("value", value, self.value)):
                expected = (*old.shape[:2], "S", old.shape[3])
                check_arg(
                    new.shape[:2] == old.shape[:2] and new.shape[3] == old.shape[3],
                    f"kv_cache {name}",
                    f"shape {expected} like the cached entries",
                    new,
                    "Use one KVCache per layer and per batch; call reset() to start a new sequence.",
                )
                check_arg(new.dtype == old.dtype and new.device == old.device, f"kv_cache {name}", f"{old.dtype} on {old.device}", new)
        if key_keep is not None or self.key_keep is not None:
            past = self.key_keep if self.key_keep is not None else self._all_kept(self.seq_len, key)
            new = key_keep if key_keep is not None else self._all_kept(key.shape[2], key)
            self.key_keep = torch.cat([past, new], dim=1)
        self.key = key if self.key is None else torch.cat([self.key, key], dim=2)
        self.value = value if self.value is None else torch.cat([self.value, value], dim=2)
        return self.key, self.value, self.key_keep

    @staticmethod
    def _all_kept(seq_len: int, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(like.shape[0], seq_len, dtype=torch.bool, device=like.device)

    def __repr__(self) -> str:
        if self.key is None:
            return "KVCache(empty)"
        keep = "None" if self.key_keep is None else tuple(self.key_keep.shape)
        return f"KVCache(key={tuple(self.key.shape)}, value={tuple(self.value.shape)}, key_keep={keep}, dtype={self.key.dtype})"
