"""`StampedCache`: computed tensors kept while what they depend on is unchanged (the class features of DPT's tuner and
of the LoRA classifier, whose stamps differ)."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StampedCache:
    """Tensors kept by key with a stamp of what else they depend on: a lookup under another stamp recomputes, and
    nothing is kept or reused while a gradient is needed (the tensors would hold, or miss, a graph)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Hashable, torch.Tensor]] = {}

    def get(self, key: tuple, stamp: Callable[[], Hashable], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()`, or what it gave under `key` while `stamp()` is unchanged (`stamp` is only called without
        gradient, so a training step pays nothing for it)."""
        if torch.is_grad_enabled():
            return compute()
        current = stamp()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == current:
            return hit[1]
        value = compute()
        self._entries[key] = (current, value)
        return value

    def forget(self, keys: Callable[[tuple], bool] = lambda key: True) -> None:
        """Drop the entries whose key `keys` selects (all of them by default)."""
        for key in [key for key in self._entries if keys(key)]:
            del self._entries[key]
