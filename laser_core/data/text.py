"""The unified text template of LASER_SPEC.md §2.1, for a user history and for a single item.

    You are an intelligent recommendation assistant. Please summarize the user's characteristics into a
    single token based on the browsing history. In chronological order, the user has browsed the following
    items: >> 1. <title> (brand: <brand>, category: <category>) >> 2. ...

An item is the same template with a history of exactly that one item. Empty brand or category fields are
left out of the parentheses (and the parentheses too when both are empty), so datasets with titles only
(SeqRecBench) read naturally. Cost knobs: ``history_len`` keeps the most recent H items (numbered 1..H);
titles and categories can be cut to a number of tokens (with a tokenizer) or characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pandas as pd
from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig

INSTRUCTION = (
    "You are an intelligent recommendation assistant. Please summarize the user's characteristics into a "
    "single token based on the browsing history. In chronological order, the user has browsed the following "
    "items:"
)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    history_len: int | None = Field(default=None, ge=1, description="keep the H most recent items (None: all)")
    title_max_tokens: int | None = Field(default=None, ge=1)
    title_max_chars: int | None = Field(default=None, ge=1)
    category_max_tokens: int | None = Field(default=None, ge=1)
    category_max_chars: int | None = Field(default=None, ge=1)
    include_brand: bool = True
    include_category: bool = True


def truncate(
    text: str, max_tokens: int | None = None, max_chars: int | None = None, tokenizer: Tokenizer | None = None
) -> str:
    """Cut ``text`` to ``max_chars`` characters (at a word boundary when possible) and/or ``max_tokens``."""
    if max_chars is not None and len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:-")
    if max_tokens is not None:
        if tokenizer is None:
            raise ValueError("a token limit needs a tokenizer")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_tokens:
            text = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()
    return text


#: the default bound on an item's title, brand and category, in characters (the longest title of the shipped
#: Amazon datasets has 841): ``dataset.max_text_chars`` at loading, and the bundle's bound at export / items add
DEFAULT_MAX_TEXT_CHARS = 2000
TEXT_FIELDS = ("title", "brand", "category")


def cut_item_texts(items: pd.DataFrame, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> tuple[pd.DataFrame, dict]:
    """``items`` with each of its :data:`TEXT_FIELDS` longer than ``max_chars`` characters cut to it
    (:func:`truncate`: at a word boundary when possible; a copy when any was cut), and how many were cut per field."""
    over = {c: items[c].astype(str).str.len() > max_chars for c in TEXT_FIELDS if c in items.columns}
    counts = {c: int(mask.sum()) for c, mask in over.items()}
    if any(counts.values()):
        items = items.copy()
        for column, mask in over.items():
            if mask.any():
                items.loc[mask, column] = [truncate(str(t), max_chars=max_chars) for t in items.loc[mask, column]]
    return items, counts


class TextFormatter:
    """Formats item and user texts with one :class:`TextConfig` (and a tokenizer for token limits)."""

    def __init__(
        self, items: pd.DataFrame, config: TextConfig | None = None, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config or TextConfig()
        needs_tok = self.config.title_max_tokens is not None or self.config.category_max_tokens is not None
        if needs_tok and tokenizer is None:
            raise ValueError("title_max_tokens/category_max_tokens need a tokenizer")
        self._descriptions = [
            self._describe(t, b, c, tokenizer) for t, b, c in zip(items["title"], items["brand"], items["category"])
        ]

    def _describe(self, title: str, brand: str, category: str, tokenizer: Tokenizer | None) -> str:
        cfg = self.config
        title = truncate(title, cfg.title_max_tokens, cfg.title_max_chars, tokenizer)
        parts = []
        if cfg.include_brand and brand:
            parts.append(f"brand: {brand}")
        if cfg.include_category and category:
            category = truncate(category, cfg.category_max_tokens, cfg.category_max_chars, tokenizer)
            parts.append(f"category: {category}")
        return f"{title} ({', '.join(parts)})" if parts else title

    def __len__(self) -> int:
        """The number of catalogue items."""
        return len(self._descriptions)

    def item_description(self, item: int) -> str:
        return self._descriptions[int(item)]

    def user_text(self, history: Sequence[int]) -> str:
        """The template over the history (time-ascending item indices), cut to the H most recent items."""
        hist = list(history)
        if not hist:
            raise ValueError("a user text needs at least one item in the history")
        if self.config.history_len is not None:
            hist = hist[-self.config.history_len :]
        body = " ".join(f">> {n}. {self._descriptions[int(i)]}" for n, i in enumerate(hist, start=1))
        return f"{INSTRUCTION} {body}"

    def item_text(self, item: int) -> str:
        """An item's text: the same template with a history of exactly that item."""
        return self.user_text([item])
