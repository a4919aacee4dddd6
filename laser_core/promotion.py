"""The promotion gate: when does a newly trained model version go to ``staging`` and when to ``production``.

The rule (ZenML's e2e template, made explicit and testable without ZenML):

* a new version is **valid** when its metric is a finite number in [0, 1]; a valid version goes at least to
  ``staging`` (an invalid one is left without a stage);
* it may reach ``production`` only when it **beats the required baselines** scored on the same test
  (history, target) pairs: by default popularity (``require_beats_popularity``), optionally the ID model, i.e. the
  frozen SR encoder Laser reads (``require_beats_id_model``); "beats" means ``new - baseline > baseline_margin``.
  A required baseline that was not scored counts as not beaten. A version that fails stays in ``staging`` with
  the reason;
* it then goes to ``production`` when there is no production version yet, or when both were scored on the same
  test pairs (same catalogue, same users) and ``new - production > min_improvement`` on ``metric`` (so with the
  default margin 0 a retrained but identical model stays in staging).

Every reason ends with what the version was compared with: the metric, the number of test users, the value of
each baseline and of production.

When a run fitted more than one model (``pipeline.models``: Laser and the lexical hybrid, ``laser_core.lexical``),
:func:`choose_model` picks the one the version serves first: the better on ``metric`` on VALIDATION (ties go to
the first in :data:`MODEL_ORDER`, Laser), never on the test pairs, so the test figure the gate then judges is not
the maximum of two noisy test figures; its test metrics then go through the gate above, and the decision says
which model won on validation and by how much, beside each model's test figure (``model``, ``validation``,
``candidates``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig


class PromotionConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    metric: str = "ndcg@10"
    min_improvement: float = Field(
        default=0.0, description="absolute margin over production on `metric` (promoted when new - production > margin)"
    )
    require_beats_popularity: bool = Field(
        default=True, description="production only when `metric` is above popularity's on the same test pairs"
    )
    require_beats_id_model: bool = Field(
        default=False,
        description="production only when `metric` is above the "
        "ID model's (the frozen SR encoder) on the same test pairs",
    )
    baseline_margin: float = Field(
        default=0.0, description="absolute margin over each required baseline (beaten when new - baseline > margin)"
    )
    enabled: bool = True


#: the models a run can fit, in the order a tie goes (``pipeline.models``; laser_core.bundle.MODEL_KINDS)
MODEL_ORDER = ("laser", "lexical_hybrid")


@dataclass(frozen=True)
class ModelChoice:
    """Which of a run's fitted models the version serves: ``model``, with the ``metric`` of each candidate on the
    same test pairs (``values``, reported) and on validation (``valid``, chosen on), and ``why`` in words (the
    winner, its validation value, the runner-up's and the difference, then the test figures)."""

    model: str
    metric: str
    values: dict[str, float]
    why: str
    valid: dict[str, float] = field(default_factory=dict)


def choose_model(
    metric: str, candidates: dict[str, dict[str, float]], validation: dict[str, dict[str, float]] | None = None
) -> ModelChoice:
    """The model the version serves among the run's fitted ones: the better on ``metric`` on VALIDATION
    (``validation``: name -> validation metrics; the lexical fit's, Laser's best stage-2 epoch's). ``candidates``
    (name -> test metrics on the same pairs) are reported, never chosen on. A tie, or a candidate without a finite
    validation value, goes by :data:`MODEL_ORDER`. With one candidate it is that one (no validation needed)."""
    if not candidates:
        raise ValueError("no model to choose from (pipeline.models is empty)")
    unknown = [name for name in candidates if name not in MODEL_ORDER]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: expected among {list(MODEL_ORDER)}")
    missing = [name for name, m in candidates.items() if metric not in m]
    if missing:
        raise KeyError(f"promotion metric {metric!r} not among the metrics of {missing}")
    values = {name: float(candidates[name][metric]) for name in MODEL_ORDER if name in candidates}
    if len(values) == 1:
        winner = next(iter(values))
        return ModelChoice(winner, metric, values, f"{winner} (the run's only model)")
    if validation is None:
        raise ValueError("choosing between models needs their validation metrics (validation=...)")
    valid = {name: float((validation.get(name) or {}).get(metric, math.nan)) for name in values}
    tests = ", ".join(f"{name} {_fmt(v)}" for name, v in values.items())
    ok = {name: v for name, v in valid.items() if math.isfinite(v)}
    if not ok:
        name = next(iter(values))
        why = f"{name}: no candidate has a finite validation {metric} (test: {tests})"
        return ModelChoice(name, metric, values, why, valid)
    best = max(ok.values())
    winner = next(name for name, v in ok.items() if v == best)  # the first in MODEL_ORDER among the best
    others = [name for name in valid if name != winner]
    second = max((n for n in others if n in ok), key=ok.get, default=others[0])
    v2 = valid[second]
    gain = best - v2 if math.isfinite(v2) else float("nan")
    rel = f", {100 * gain / v2:+.1f} %" if math.isfinite(v2) and v2 > 0 else ""
    verdict = "ties" if gain == 0 else "beats"
    why = (
        f"{winner} {verdict} {second} on validation {metric}: {best:.4f} vs {_fmt(v2)} ({gain:+.4f}{rel}), so the "
        f"version serves {winner} (chosen on validation; on the same test pairs {tests})"
    )
    return ModelChoice(winner, metric, values, why, valid)


@dataclass
class PromotionDecision:
    metric: str
    new_value: float | None
    production_value: float | None = None
    production_version: str | None = None
    popularity_value: float | None = None
    id_model_value: float | None = None
    id_model: str | None = None  # the ID model's name (sasrec, bert4rec, ...)
    users: int | None = None  # test users (pairs) the new version and the baselines were scored on
    beats_baselines: bool | None = None  # None: no baseline required
    valid: bool = False
    comparable: bool = True
    stage: str | None = None  # "production" | "staging" | None
    reason: str = ""
    details: dict = field(default_factory=dict)
    model: str | None = None  # the model the version serves (MODEL_ORDER); None: a decision from before
    candidates: dict = field(default_factory=dict)  # each fitted model's `metric` on the same test pairs
    validation: dict = field(default_factory=dict)  # each fitted model's `metric` on validation (chosen on)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "PromotionDecision":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def compared_with(self) -> str:
        """``compared on ndcg@10 over the same 24 test users: popularity 0.1450 (required), ID model sasrec 0.2000,
        production v1 0.3700``."""
        users = f"the same {self.users} test users" if self.users is not None else "the same test users"
        required = set(self.details.get("required_baselines", []))
        parts = [f"popularity {_fmt(self.popularity_value)}" + (" (required)" if "popularity" in required else "")]
        if self.id_model_value is not None or "id_model" in required:
            parts.append(
                f"ID model {self.id_model or ''} {_fmt(self.id_model_value)}".replace("  ", " ")
                + (" (required)" if "id_model" in required else "")
            )
        if self.production_version is None:
            parts.append("production none")
        else:
            parts.append(
                f"production v{self.production_version} {_fmt(self.production_value)}"
                + ("" if self.comparable else " (not re-scorable here)")
            )
        return f"compared on {self.metric} over {users}: " + ", ".join(parts)

    def to_markdown(self) -> str:
        rows = [
            ("metric", self.metric),
            ("test users", "-" if self.users is None else self.users),
            ("new version", _fmt(self.new_value)),
            (
                "production" + (f" (v{self.production_version})" if self.production_version else ""),
                _fmt(self.production_value),
            ),
            ("popularity", _fmt(self.popularity_value)),
            ("ID model" + (f" ({self.id_model})" if self.id_model else ""), _fmt(self.id_model_value)),
            ("beats required baselines", "-" if self.beats_baselines is None else self.beats_baselines),
            ("valid", self.valid),
            ("comparable", self.comparable),
            ("stage", self.stage or "none"),
        ]
        if self.model is not None:
            rows.insert(2, ("model served", self.model))
        for name, value in self.candidates.items():
            rows.insert(3, (f"candidate {name}", _fmt(value)))
        for name, value in self.validation.items():
            rows.insert(3, (f"candidate {name} (validation, chosen on)", _fmt(value)))
        body = "\n".join(f"| {a} | {b} |" for a, b in rows)
        return f"# Promotion decision\n\n| | |\n| --- | --- |\n{body}\n\n{self.reason}\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and 0.0 <= v <= 1.0


def _value(metrics: dict[str, float] | None, m: str) -> float | None:
    if not metrics or metrics.get(m) is None:
        return None
    return float(metrics[m])


def decide(
    config: PromotionConfig,
    new: dict[str, float],
    production: dict[str, float] | None = None,
    production_version: str | None = None,
    comparable: bool = True,
    popularity: dict[str, float] | None = None,
    id_model: dict[str, float] | None = None,
    id_model_name: str | None = None,
    users: int | None = None,
    candidates: dict[str, dict[str, float]] | None = None,
    validation: dict[str, dict[str, float]] | None = None,
) -> PromotionDecision:
    """Apply the gate. ``new`` / ``production`` / ``popularity`` / ``id_model`` are metric dicts on the same
    ``users`` test pairs (``production`` None when there is no production version; ``comparable`` False when it
    was trained on a different catalogue, so it could not be re-scored on these pairs). ``candidates``: each
    model the run fitted (name -> test metrics on the same pairs), ``validation`` their validation metrics; then
    ``new`` is ignored and the gate judges the test metrics of the one chosen on validation
    (:func:`choose_model`), the reason saying which won on validation and by how much."""
    m = config.metric
    choice = None
    if candidates:
        choice = choose_model(m, candidates, validation)
        new = candidates[choice.model]
    if m not in new:
        raise KeyError(f"promotion metric {m!r} not among the new version's metrics ({sorted(new)})")
    required = [
        name
        for name, on in (("popularity", config.require_beats_popularity), ("id_model", config.require_beats_id_model))
        if on
    ]
    d = PromotionDecision(
        metric=m,
        new_value=float(new[m]),
        production_value=_value(production, m),
        production_version=production_version,
        popularity_value=_value(popularity, m),
        id_model_value=_value(id_model, m),
        id_model=id_model_name,
        users=None if users is None else int(users),
        comparable=comparable,
        details={
            "required_baselines": required,
            "baseline_margin": config.baseline_margin,
            "min_improvement": config.min_improvement,
        },
    )
    if choice is not None:
        d.model, d.candidates, d.validation = choice.model, dict(choice.values), dict(choice.valid)
    _gate(config, d, production, production_version, comparable, id_model_name)
    if choice is not None and len(choice.values) > 1:
        d.reason = f"{choice.why}; {d.reason}"
    return d


def _gate(
    config: PromotionConfig,
    d: PromotionDecision,
    production: dict[str, float] | None,
    production_version: str | None,
    comparable: bool,
    id_model_name: str | None,
) -> None:
    """The gate's stage and reason for ``d`` (set in place)."""
    m = config.metric
    required = d.details["required_baselines"]
    if not _ok(d.new_value):
        d.reason = f"not promoted: {m} = {d.new_value} is not a valid metric value ({d.compared_with()})"
        return
    d.valid = True
    missing, beaten_by = [], []
    for name in required:
        value = d.popularity_value if name == "popularity" else d.id_model_value
        label = "popularity" if name == "popularity" else f"the ID model{' ' + id_model_name if id_model_name else ''}"
        if not _ok(value):
            missing.append(label)
        elif d.new_value - value <= config.baseline_margin:
            beaten_by.append(f"{label} ({value:.4f})")
    if required:
        d.beats_baselines = not (missing or beaten_by)
    if missing or beaten_by:
        why = []
        if beaten_by:
            margin = f" by more than {config.baseline_margin:+.4f}" if config.baseline_margin else ""
            why.append(f"{m} {d.new_value:.4f} does not beat {' nor '.join(beaten_by)}{margin} on the same test pairs")
        if missing:
            why.append(f"no score of {' nor '.join(missing)} on these test pairs to compare with")
        d.stage = "staging"
        d.reason = f"staged, not production (baseline gate): {'; '.join(why)} ({d.compared_with()})"
        return
    if not config.enabled:
        d.stage = "staging"
        d.reason = f"promotion to production disabled (promotion.enabled: false); staged ({d.compared_with()})"
        return
    if production is None and production_version is None:
        d.stage = "production"
        d.reason = f"no production version yet: promoted with {m} {d.new_value:.4f} ({d.compared_with()})"
        return
    if not comparable or d.production_value is None:
        d.stage = "staging"
        d.reason = (
            f"staged: production v{production_version} was trained on a different catalogue, so it "
            "cannot be re-scored on these test pairs; promote by hand (`laser model promote`) if intended "
            f"({d.compared_with()})"
        )
        return
    gain = d.new_value - d.production_value
    if gain > config.min_improvement:
        d.stage = "production"
        d.reason = (
            f"promoted: {m} {d.new_value:.4f} vs production v{production_version} "
            f"{d.production_value:.4f} (gain {gain:+.4f} > margin {config.min_improvement:+.4f}; "
            f"{d.compared_with()})"
        )
    else:
        d.stage = "staging"
        d.reason = (
            f"staged: {m} {d.new_value:.4f} vs production v{production_version} "
            f"{d.production_value:.4f} (gain {gain:+.4f} <= margin {config.min_improvement:+.4f}; "
            f"{d.compared_with()})"
        )
