"""A prompt encoder that encodes a fixed prompt set once: the per-prompt cache and the release
of the encoder modules, shared by HunyuanVideo-1.5's `PromptEncoder` and Wan's `WanPromptEncoder`.

Owns: `CachedPromptEncoder.encode_all` (every prompt not cached yet, in first-seen order, in
chunks of `batch_size`), `released` and `release` (the modules named in `ENCODERS` set to None;
the cache stays, so a released encoder still serves every cached prompt).

Leaves to others (the subclasses): loading the encoders, `_encode_batch` (a list of prompts ->
one cached entry per prompt) and `encode` (a batch assembled from the cache).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["CachedPromptEncoder"]


class CachedPromptEncoder:
    """Base of the pipelines' prompt encoders: `self._cache[prompt]` holds what `_encode_batch`
    returned for it; the subclass sets `self.device` and its encoder attributes."""

    #: attributes holding the encoder modules, freed by `release` (the first one tells `released`)
    ENCODERS: tuple[str, ...] = ("text_encoder",)
    log = logging.getLogger("sage_fast.models")

    def __init__(self) -> None:
        self._cache: dict = {}

    @property
    def released(self) -> bool:
        return getattr(self, self.ENCODERS[0]) is None

    def _encode_batch(self, prompts: list[str]) -> list:
        raise NotImplementedError

    def encode_all(self, prompts: list[str], batch_size: int = 8) -> None:
        """Encode and cache every prompt not cached yet."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo and self.released:
            what = "text encoders were" if len(self.ENCODERS) > 1 else "text encoder was"
            raise RuntimeError(f"the {what} released; {len(todo)} prompts are not cached (first: {todo[0]!r})")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            self._cache.update(zip(chunk, self._encode_batch(chunk)))
        if todo:
            self.log.info("encoded %d prompts", len(todo))

    def release(self) -> None:
        """Free the encoders (the cache stays): GRPO encodes its fixed prompt set once."""
        for name in self.ENCODERS:
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
