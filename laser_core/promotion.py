"""The promotion gate: when does a newly trained model version go to ``staging`` and when to ``production``.

The rule (ZenML's e2e template, made explicit and testable without ZenML):

* a new version is **valid** when every compared metric is a finite number in [0, 1] and, if
  ``require_beats_popularity`` is on, its metric is above the popularity baseline's on the same test pairs;
  a valid version goes to ``staging`` (an invalid one is left without a stage);
* it goes to ``production`` when there is no production version yet, or when both were scored on the same test
  pairs (same catalogue, same users) and ``new - production > min_improvement`` on ``metric`` (so with the
  default margin 0 a retrained but identical model stays in staging).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class PromotionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = "ndcg@10"
    min_improvement: float = Field(default=0.0, description="absolute margin over production on `metric` "
                                   "(promoted when new - production > margin)")
    require_beats_popularity: bool = False
    enabled: bool = True


@dataclass
class PromotionDecision:
    metric: str
    new_value: float | None
    production_value: float | None = None
    production_version: str | None = None
    popularity_value: float | None = None
    valid: bool = False
    comparable: bool = True
    stage: str | None = None          # "production" | "staging" | None
    reason: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "PromotionDecision":
        return cls(**raw)

    def to_markdown(self) -> str:
        rows = [("metric", self.metric), ("new version", _fmt(self.new_value)),
                ("production" + (f" (v{self.production_version})" if self.production_version else ""),
                 _fmt(self.production_value)),
                ("popularity", _fmt(self.popularity_value)), ("valid", self.valid), ("comparable", self.comparable),
                ("stage", self.stage or "none")]
        body = "\n".join(f"| {a} | {b} |" for a, b in rows)
        return f"# Promotion decision\n\n| | |\n| --- | --- |\n{body}\n\n{self.reason}\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and 0.0 <= v <= 1.0


def decide(config: PromotionConfig, new: dict[str, float], production: dict[str, float] | None = None,
           production_version: str | None = None, comparable: bool = True,
           popularity: dict[str, float] | None = None) -> PromotionDecision:
    """Apply the gate. ``new`` / ``production`` / ``popularity`` are metric dicts on the same test pairs
    (``production`` None when there is no production version; ``comparable`` False when it was trained on a
    different catalogue, so it could not be re-scored on these pairs)."""
    m = config.metric
    if m not in new:
        raise KeyError(f"promotion metric {m!r} not among the new version's metrics ({sorted(new)})")
    d = PromotionDecision(metric=m, new_value=float(new[m]),
                          production_value=None if production is None else float(production[m]),
                          production_version=production_version,
                          popularity_value=None if popularity is None else float(popularity[m]),
                          comparable=comparable)
    if not _ok(d.new_value):
        d.reason = f"not promoted: {m} = {d.new_value} is not a valid metric value"
        return d
    if config.require_beats_popularity and d.popularity_value is not None and d.new_value <= d.popularity_value:
        d.reason = (f"not promoted: {m} {d.new_value:.4f} does not beat the popularity baseline "
                    f"({d.popularity_value:.4f}) on the same test pairs")
        return d
    d.valid = True
    if not config.enabled:
        d.stage, d.reason = "staging", "promotion to production disabled (promotion.enabled: false); staged"
        return d
    if production is None and production_version is None:
        d.stage, d.reason = "production", f"no production version yet: promoted with {m} {d.new_value:.4f}"
        return d
    if not comparable or d.production_value is None:
        d.stage = "staging"
        d.reason = (f"staged: production v{production_version} was trained on a different catalogue, so it "
                    "cannot be re-scored on these test pairs; promote by hand (`laser model promote`) if intended")
        return d
    gain = d.new_value - d.production_value
    if gain > config.min_improvement:
        d.stage = "production"
        d.reason = (f"promoted: {m} {d.new_value:.4f} vs production v{production_version} "
                    f"{d.production_value:.4f} (gain {gain:+.4f} > margin {config.min_improvement:+.4f})")
    else:
        d.stage = "staging"
        d.reason = (f"staged: {m} {d.new_value:.4f} vs production v{production_version} "
                    f"{d.production_value:.4f} (gain {gain:+.4f} <= margin {config.min_improvement:+.4f})")
    return d
