"""The base of every config model: unknown keys are errors, and values are never coerced across types.

Pydantic's default ("lax") mode turns a YAML ``lr: true`` into ``lr = 1.0``, ``epochs: 2.0`` into ``2`` and the
string ``"3"`` into ``3``. Strict mode refuses all of these with an error naming the field; the one coercion it
keeps is the harmless one, an integer for a float field (``lr: 1`` is ``1.0``). Nested sections may still be
given as mappings (YAML, JSON, ``model_dump()``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def describe_validation_error(exc: ValidationError) -> str:
    """``section.field: message (got value)`` for each problem, joined with ``; ``."""
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        text = f"{where}: {e['msg']}"
        value = e.get("input")
        if e["type"] != "missing" and not isinstance(value, (dict, list)) and len(repr(value)) <= 60:
            text += f" (got {value!r})"
        problems.append(text)
    return "; ".join(problems)
