"""The unified template (LASER_SPEC.md §2.1) for users and items, with its cost knobs."""

import pandas as pd
import pytest

from laser_core.data.text import INSTRUCTION, TextConfig, TextFormatter, truncate

ITEMS = pd.DataFrame(
    {
        "item_id": ["a", "b", "c"],
        "title": ["Digital Caliper 6 Inch Stainless", "Nitrile Gloves", "Beaker"],
        "brand": ["Acme", "", ""],
        "category": ["Tools Measuring", "Lab Supplies", ""],
    }
)


class WordTokenizer:
    """One token per whitespace-separated word (enough to test token limits)."""

    def encode(self, text, add_special_tokens=False):
        self.vocab = text.split()
        return list(range(len(self.vocab)))

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.vocab[i] for i in ids)


def test_user_and_item_text_exact():
    fmt = TextFormatter(ITEMS)
    assert fmt.user_text([0, 1, 2]) == (
        f"{INSTRUCTION} >> 1. Digital Caliper 6 Inch Stainless (brand: Acme, category: Tools Measuring) "
        ">> 2. Nitrile Gloves (category: Lab Supplies) >> 3. Beaker"
    )
    assert fmt.item_text(1) == f"{INSTRUCTION} >> 1. Nitrile Gloves (category: Lab Supplies)"
    assert fmt.item_text(1) == fmt.user_text([1])
    assert INSTRUCTION.startswith(
        "You are an intelligent recommendation assistant. Please summarize the user's "
        "characteristics into a single token based on the browsing history."
    )


def test_history_len_keeps_most_recent_and_renumbers():
    fmt = TextFormatter(ITEMS, TextConfig(history_len=2))
    text = fmt.user_text([0, 1, 2])
    assert ">> 1. Nitrile Gloves" in text and ">> 2. Beaker" in text and "Caliper" not in text


def test_title_limits_chars_and_tokens():
    assert truncate("Digital Caliper 6 Inch Stainless", max_chars=18) == "Digital Caliper 6"
    fmt = TextFormatter(ITEMS, TextConfig(title_max_tokens=2, category_max_tokens=1), tokenizer=WordTokenizer())
    assert fmt.item_description(0) == "Digital Caliper (brand: Acme, category: Tools)"
    with pytest.raises(ValueError, match="need a tokenizer"):
        TextFormatter(ITEMS, TextConfig(title_max_tokens=2))


def test_options_and_errors():
    fmt = TextFormatter(ITEMS, TextConfig(include_brand=False, include_category=False))
    assert fmt.item_description(0) == "Digital Caliper 6 Inch Stainless"
    with pytest.raises(ValueError, match="at least one item"):
        fmt.user_text([])
    with pytest.raises(ValueError):
        TextConfig(history_len=0)
