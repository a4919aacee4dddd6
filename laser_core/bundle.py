"""The export bundle format: one folder of files described by one manifest, ``laser_export.json``.

This module is the format, and the one place that knows it: the file names and constants, the manifest's
pydantic model (:class:`BundleManifest`, checked on write and on load), the folder's file list and hashes, the
scorer graph (written by :func:`export_scorer`, read back by :func:`read_scorer_table`), the tokenizer file
serving reads (:func:`load_tokenizer`) and :class:`ExportBundle`, the pipeline's artifact for a bundle. The
writer (:mod:`laser_core.export`, torch side), the reader (:mod:`laser_core.serving`, torch-free) and the
registry commands import it; it imports neither of them, and neither imports the other.

Layout (``docs/serving.md``)::

    laser_export.json    manifest: format_version, k, dim, n_items, text config, SR max_len, prefix/pooling,
                         cold-item treatment and weights, file sha256s, popularity flag, ``metadata`` (model version)
    scorer.onnx          user_embedding [B, d] -> scores [B, k] (cosines), indices [B, k] (catalogue rows)
    user_tower.onnx      item_ids/item_mask [B, L_sr] + input_ids/attention_mask [B, T] (+ item_side [B] when the
                         item table was made with other weights than the user side's) -> user_embedding [B, d]
    items.parquet        the catalogue in table-row order: item_id, title, brand, category (+ popularity)
    tokenizer/           the backbone's tokenizer (``save_pretrained``; ``tokenizer.json`` is what serving reads)
    item_index.hnsw      optional: an ANN index over the scorer's table (``laser_core.ann``; manifest ``ann_index``)

The manifest: types are strict (``"10"`` or ``10.0`` is not an integer, ``1`` is not a boolean), unknown fields
are rejected everywhere except inside ``metadata`` (free JSON from the exporter, e.g. ``model_version``), and
the fields must agree with each other (``k <= n_items``, the scorer's ``k`` is the bundle's, ``added_items``
account for the rows past ``n_trained_items``, every file the manifest names is listed in ``files`` ...). It is
built, edited (``model_copy(update=...)``, validated again by :func:`write_manifest`) and read as a
:class:`BundleManifest` everywhere. Format 1 is upgraded on read by :func:`upgrade_manifest`; a bundle of another
``format_version`` is refused with a message saying whether it is older or newer.

:func:`verify_bundle` checks the folder against ``files`` (no symbolic link anywhere in it: :func:`check_inside`;
the trust model is in ``docs/serving.md``): every file of the bundle (but the manifest) must be
listed, every listed file must exist, and (``hashes=True``) match its sha256. :func:`check_loaded` checks what
only the loaded files can tell: the catalogue's columns and rows, the scorer's table shape and top-k, the user
tower's inputs and width. Every failure is a :class:`BundleError` naming the file and the field.

Torch-free (serving imports it); ``onnx`` and ``tokenizers`` are imported by the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from laser_core.configuration import reads_item_ids
from laser_core.data.text import DEFAULT_MAX_TEXT_CHARS, TextConfig, cut_item_texts
from laser_core.score_stats import norm_column

# ------------------------------------------------------------------------------------------- names
FORMAT_VERSION = 2  # 2: fusion, cold_item.item_weights(_note), added_items[].item_weights, ann_index required
MANIFEST = "laser_export.json"
SCORER = "scorer.onnx"
USER_TOWER = "user_tower.onnx"
CATALOGUE = "items.parquet"
TOKENIZER_DIR = "tokenizer"
SCORER_OPSET = 17
SCORER_TABLE = "item_table_t"  # scorer.onnx initializer: the L2-normalized item table, transposed [d, n_items]
ITEM_COLUMNS = ("item_id", "title", "brand", "category")
COLD_ITEM = -1  # item id in user_tower.onnx's ``item_ids`` for a visible position of an item without an ID
ITEM_SIDE = "item_side"  # user_tower.onnx input [B] int64: 1 = embed the row as an item-table row, 0 = as a user
TOWER_INPUTS_MFORMER = ["item_ids", "item_mask", "input_ids", "attention_mask"]
TOWER_INPUTS_TEXT = ["input_ids", "attention_mask"]
TOWER_INPUTS_LEXICAL = ["item_ids", "item_mask"]  # the lexical hybrid's tower: the item-id history only

#: the model a bundle serves (manifest ``model_kind``; omitted from the JSON for Laser, so that a Laser bundle reads
#: as it always did): Laser, or the lexical hybrid (``laser_core.lexical``: the ID model + TF-IDF similarity,
#: z-scored per user, in one dot product; its ``lexical`` section says how)
MODEL_KINDS = ("laser", "lexical_hybrid")
LEXICAL_DIR = "lexical"  # the lexical hybrid's TF-IDF state and item-side statistics
LEXICAL_ITEM_SIDE = f"{LEXICAL_DIR}/item_side.safetensors"  # id_mean, text_mean, unknown_id (float32)
TOWER_TEXT_TABLE = "text_table"  # the lexical tower's initializer: the items' unit text rows [n_items, text_dim]

#: how a cold item (no trained ID embedding) enters the frozen SR encoder; written to the manifest
COLD_ITEM_TREATMENT = (
    "A cold item is one visible position (item_ids = -1, item_mask = 1) in the SR encoder's input whose ID "
    "embedding is the SR model's unknown-item vector: BERT4Rec's trained [MASK] token embedding (the cloze "
    "token for 'an item not shown here'); SASRec has no such token, so it gets the padding embedding (zero) "
    "and the position carries only its position embedding. The text side is the item template as in training."
)


#: which weights embed new items (``LaserWeights.cold_item_weights``); written to the manifest's ``cold_item``
COLD_ITEM_WEIGHTS = {
    "item_side": f"the weights that made the item table (Laser's stage 1), held in {USER_TOWER} beside the user "
    f"side's (stage 2; the backbone is shared): input {ITEM_SIDE} = 1 embeds a row as an item, as "
    f"add_items does, 0 as a user; new items are embedded as the table's rows were",
    "shared": "the user tower's weights, which also made the item table: new items are embedded as the table's "
    "rows were",
    "user_side": "the user side's weights (stage 2); the weights that made the item table are not in the bundle "
    "(an export from before the item side was kept), so new items come from other weights than the "
    "table's rows",
    "lexical": f"the lexical hybrid's item side ({LEXICAL_DIR}/): the text side from the item's text through the "
    "TF-IDF vectorizer and truncated SVD that made the table's rows, the ID side the ID model's unknown-item "
    "vector, both centred by the trained catalogue's means: new items are embedded as the table's rows were",
}

#: how a new item enters the lexical hybrid's tower and table (the manifest's ``cold_item.treatment``)
LEXICAL_COLD_ITEM_TREATMENT = (
    "An added item (a catalogue row past n_trained_items) has no trained ID embedding: in a history the tower "
    "encodes it as the ID model's cold item (its unknown-item vector) and reads its text row from the tower's "
    "text table; as a candidate its ID side is the unknown-item vector."
)


class BundleError(RuntimeError):
    """A bundle is missing a file, holds a file its manifest does not list, has a malformed or inconsistent
    manifest (or one of another format version), or a file whose sha256 does not match."""


# ------------------------------------------------------------------------------------------------ types
def _bundle_path(value: str) -> str:
    """A file inside the bundle: a relative POSIX path without ``.``/``..`` parts (nothing outside the folder)."""
    parts = value.split("/")
    if not value or "\\" in value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{value!r} is not a relative path inside the bundle (POSIX, no '.' or '..' parts)")
    if value == MANIFEST:
        raise ValueError(f"{MANIFEST} cannot describe itself")
    return value


def _sha256(value: str) -> str:
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError("must be a sha256 digest (64 lowercase hex characters)")
    return value


def _cold_item_weights(value: str) -> str:
    if value not in COLD_ITEM_WEIGHTS:
        raise ValueError(f"must be one of {sorted(COLD_ITEM_WEIGHTS)}, got {value!r}")
    return value


BundlePath = Annotated[str, AfterValidator(_bundle_path)]
ColdItemWeights = Annotated[str, AfterValidator(_cold_item_weights)]  # COLD_ITEM_WEIGHTS
Sha256 = Annotated[str, AfterValidator(_sha256)]
Name = Annotated[str, StringConstraints(min_length=1)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SRSection(_Section):
    model: Name
    max_len: PositiveInt


class BiTuneSection(_Section):
    prefix: Literal["mformer", "plain", "none"]
    pooling: Literal["suffix", "mean", "eos"]
    n_query: NonNegativeInt
    n_experts: NonNegativeInt
    fusion: Literal["none", "concat", "zscore"]


class BackboneSection(_Section):
    name: Name
    trained_quantization: Name  # BackboneConfig.quantization (nf4, int8, none)
    exported_dtype: Name
    exported_weights: Name


class TokenizerSection(_Section):
    dir: BundlePath
    file: BundlePath
    pad_token_id: NonNegativeInt
    eos_token_id: NonNegativeInt
    clean_up_tokenization_spaces: bool


class ScorerSection(_Section):
    file: BundlePath
    k: PositiveInt
    input: Literal["user_embedding"]
    outputs: list[Literal["scores", "indices"]]
    opset: PositiveInt


class UserTowerSection(_Section):
    file: BundlePath
    inputs: list[Literal["item_ids", "item_mask", "input_ids", "attention_mask", "item_side"]]
    output: Literal["user_embedding"]
    opset: PositiveInt
    external_data: bool


class CatalogueSection(_Section):
    file: BundlePath
    columns: list[Name]
    row_order: str


class ColdItemSection(_Section):
    item_id: int
    treatment: Name
    item_weights: ColdItemWeights  # which weights embed new items (COLD_ITEM_WEIGHTS)
    item_weights_note: Name


class AddedItemsEntry(_Section):
    n: PositiveInt
    first_row: NonNegativeInt
    source_manifest_sha256: Sha256
    item_weights: ColdItemWeights  # the bundle's cold_item weights when the items were added


class AnnCalibration(_Section):
    queries: PositiveInt
    query_rule: str
    k: PositiveInt
    target_recall: Annotated[float, Field(gt=0, le=1)]
    recall: Annotated[float, Field(ge=0, le=1)]
    reached: bool


class AnnIndexSection(_Section):
    """The optional approximate-nearest-neighbour index over the scorer's table (``laser_core.ann``)."""

    file: BundlePath
    library: Literal["hnswlib"]
    library_version: Name
    kind: Literal["hnsw"]
    metric: Literal["ip"]
    n_items: PositiveInt
    dim: PositiveInt
    M: PositiveInt
    ef_construction: PositiveInt
    ef_search: PositiveInt
    scorer_sha256: Sha256  # of the file holding the scorer's table (scorer_table_file)
    calibration: AnnCalibration | None  # null: ef_search was given, not calibrated


class LexicalSection(_Section):
    """How a lexical-hybrid bundle scores (``laser_core.lexical``; ``docs/serving.md``): per user,
    ``z(id scores) + gamma * z(text cosines)`` over the trained catalogue, served as one cosine: the tower's user
    row ``[u_id / sd_id(u), gamma * u_txt / sd_txt(u), 0]`` against the table's rows ``[v_id - mean_id,
    t - mean_txt, sqrt(norm_bound^2 - ||...||^2)] / norm_bound`` (the last column makes every row's norm
    ``norm_bound``, so the scorer's cosine ranks as the dot product)."""

    id_model: Name  # the ID model (sasrec, bert4rec)
    form: Name  # the user's text vector: laser_core.hybrid.FORMS
    gamma: Annotated[float, Field(ge=0)]
    id_dim: PositiveInt
    text_dim: PositiveInt
    norm_bound: Annotated[float, Field(gt=0)]  # the largest centred row's norm (the augmentation's bound)
    n_stat_items: PositiveInt  # the items the z-score statistics are over (the trained catalogue)
    tfidf: dict[str, JsonValue]  # laser_core.hybrid.TfidfConfig
    tfidf_dir: BundlePath  # the fitted TF-IDF vectorizer and SVD (their own save format, no pickle)
    item_side: BundlePath  # LEXICAL_ITEM_SIDE
    valid: dict[str, float]  # the chosen setting's validation metrics
    blend: str  # the formula, in words


def scorer_table_file(files: dict[str, str], scorer_file: str) -> str:
    """The bundle file that holds the scorer's table values: ``<scorer>.data`` when :func:`export_scorer` wrote
    it as external data (tables of 1 GiB and more), else the scorer itself."""
    return scorer_file + ".data" if scorer_file + ".data" in files else scorer_file


# ---------------------------------------------------------------------------------------------- manifest
class BundleManifest(_Section):
    """``laser_export.json`` (layout in ``docs/serving.md``): built as ``BundleManifest(...)`` by the exporter,
    edited with ``model_copy(update=...)`` and written (re-validated) by :func:`write_manifest`, read by
    :func:`load_manifest` (a format-1 manifest upgraded by :func:`upgrade_manifest` first)."""

    format: Literal["laser-export"]
    format_version: Literal[2]
    created_by: Name
    k: PositiveInt
    dim: PositiveInt
    n_items: PositiveInt
    n_trained_items: PositiveInt
    text: TextConfig  # the item-text settings (the lexical hybrid's: what its TF-IDF read)
    sr: SRSection | None
    bitune: BiTuneSection | None  # null for the lexical hybrid (no LLM), as backbone and tokenizer
    backbone: BackboneSection | None
    tokenizer: TokenizerSection | None
    scorer: ScorerSection
    user_tower: UserTowerSection | None
    parity_max_abs_diff: Annotated[float, Field(ge=0)] | None
    catalogue: CatalogueSection
    popularity: bool
    cold_item: ColdItemSection
    added_items: list[AddedItemsEntry]
    metadata: dict[str, JsonValue]  # free JSON from the exporter: the one place where any key is allowed
    files: dict[BundlePath, Sha256] = Field(min_length=1)
    ann_index: AnnIndexSection | None  # null: no ANN index
    model_kind: Literal["laser", "lexical_hybrid"] = "laser"  # MODEL_KINDS; not written for Laser
    lexical: LexicalSection | None = None  # the lexical hybrid's settings; not written for Laser

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _cross_field_problems(m: BundleManifest) -> list[str]:
    """Disagreements between fields, each as ``field 'NAME': problem``."""
    out: list[str] = []

    def bad(field: str, problem: str) -> None:
        out.append(f"field {field!r}: {problem}")

    if m.k > m.n_items:
        bad("k", f"{m.k} exceeds n_items ({m.n_items})")
    if m.scorer.k != m.k:
        bad("scorer.k", f"{m.scorer.k} differs from k ({m.k})")
    if m.scorer.outputs != ["scores", "indices"]:
        bad("scorer.outputs", f"must be ['scores', 'indices'], got {m.scorer.outputs}")
    if m.n_trained_items > m.n_items:
        bad("n_trained_items", f"{m.n_trained_items} exceeds n_items ({m.n_items})")
    row = m.n_trained_items
    for i, entry in enumerate(m.added_items):
        if entry.first_row != row:
            bad(f"added_items[{i}].first_row", f"{entry.first_row}, but the rows before it end at {row}")
        row += entry.n
    if row != m.n_items and m.n_trained_items <= m.n_items:
        bad(
            "added_items",
            f"n_trained_items ({m.n_trained_items}) plus the added items ({row - m.n_trained_items})"
            f" is {row}, not n_items ({m.n_items})",
        )
    if m.parity_max_abs_diff is not None and not math.isfinite(m.parity_max_abs_diff):
        bad("parity_max_abs_diff", f"must be finite, got {m.parity_max_abs_diff}")
    named = {"scorer.file": m.scorer.file, "catalogue.file": m.catalogue.file}
    if m.user_tower is not None:
        named["user_tower.file"] = m.user_tower.file
    if m.model_kind == "lexical_hybrid":
        _lexical_problems(m, bad, named)
    else:
        _laser_problems(m, bad, named)
    columns = [*ITEM_COLUMNS, *(["popularity"] if m.popularity else [])]
    if m.catalogue.columns != columns:
        bad("catalogue.columns", f"must be {columns} (popularity={m.popularity}), got {m.catalogue.columns}")
    if m.cold_item.item_id != COLD_ITEM:
        bad("cold_item.item_id", f"must be {COLD_ITEM}, got {m.cold_item.item_id}")
    if m.ann_index is not None:
        named["ann_index.file"] = m.ann_index.file
        if m.ann_index.n_items != m.n_items:
            bad("ann_index.n_items", f"{m.ann_index.n_items} differs from n_items ({m.n_items})")
        if m.ann_index.dim != m.dim:
            bad("ann_index.dim", f"{m.ann_index.dim} differs from dim ({m.dim})")
        table_file = scorer_table_file(m.files, m.scorer.file)
        table_sha = m.files.get(table_file)
        if table_sha is not None and m.ann_index.scorer_sha256 != table_sha:
            bad(
                "ann_index.scorer_sha256",
                f"the index {m.ann_index.file!r} was built over another scorer table (its scorer_sha256 "
                f"{m.ann_index.scorer_sha256[:12]}... is not {table_file!r}'s {table_sha[:12]}...); "
                f"rebuild it (laser index build)",
            )
    for field, name in named.items():
        if name not in m.files:
            bad(field, f"{name!r} is not listed (with its sha256) in 'files'")
    version = m.metadata.get("model_version")
    if "model_version" in m.metadata and not (isinstance(version, str) and version.strip()):
        bad("metadata.model_version", f"must be a non-empty string, got {version!r}")
    return out


def _laser_problems(m: BundleManifest, bad: Any, named: dict[str, str]) -> None:
    """The cross-field rules of a Laser bundle (``model_kind`` ``laser``); ``named``: the files it names."""
    missing = [f for f in ("bitune", "backbone", "tokenizer") if getattr(m, f) is None]
    for f in missing:
        bad(f, "null, but a Laser bundle needs it (only a lexical_hybrid bundle has none)")
    if m.lexical is not None:
        bad("lexical", "set, but model_kind is 'laser' (the section belongs to a lexical_hybrid bundle)")
    if missing:
        return
    if m.cold_item.item_weights == "lexical":
        bad("cold_item.item_weights", "'lexical' is for a lexical_hybrid bundle")
    fusion = m.bitune.fusion != "none"
    mformer = reads_item_ids(m.bitune.prefix, m.bitune.fusion)  # the tower reads the item-id history
    if mformer and m.sr is None:
        bad("sr", "the M-Former prefix and the fusion need the SR encoder's settings (model, max_len), got null")
    if not mformer and m.sr is not None:
        bad("sr", f"must be null for bitune.prefix {m.bitune.prefix!r}")
    if m.user_tower is not None:
        want = TOWER_INPUTS_MFORMER if mformer else TOWER_INPUTS_TEXT
        allowed = [[*want, ITEM_SIDE]] if fusion else [want, [*want, ITEM_SIDE]]
        if m.user_tower.inputs not in allowed:
            bad(
                "user_tower.inputs",
                f"must be {want} (+ {ITEM_SIDE!r} when the item side has its own weights or "
                f"the model is fused) for bitune.prefix {m.bitune.prefix!r}, "
                f"got {m.user_tower.inputs}",
            )
        if ITEM_SIDE in m.user_tower.inputs and m.cold_item.item_weights != "item_side" and not fusion:
            bad(
                "cold_item.item_weights",
                f"the user tower has an {ITEM_SIDE!r} input, so it must be 'item_side', "
                f"got {m.cold_item.item_weights!r}",
            )
    if not m.tokenizer.file.startswith(m.tokenizer.dir + "/"):
        bad("tokenizer.file", f"{m.tokenizer.file!r} is not inside tokenizer.dir {m.tokenizer.dir!r}")
    named["tokenizer.file"] = m.tokenizer.file


def _lexical_problems(m: BundleManifest, bad: Any, named: dict[str, str]) -> None:
    """The cross-field rules of a lexical-hybrid bundle (``laser_core.lexical``)."""
    lex = m.lexical
    if lex is None:
        bad("lexical", "null, but model_kind is 'lexical_hybrid' (the section says how the bundle scores)")
        return
    for f in ("bitune", "backbone", "tokenizer"):
        if getattr(m, f) is not None:
            bad(f, "must be null for a lexical_hybrid bundle (it has no LLM)")
    if m.sr is None:
        bad("sr", "the lexical hybrid's tower reads the item-id history: needs the ID model's settings, got null")
    elif m.sr.model != lex.id_model:
        bad("lexical.id_model", f"{lex.id_model!r} differs from sr.model {m.sr.model!r}")
    if m.user_tower is None:
        bad("user_tower", "null, but the lexical hybrid's user rows come only from its tower")
    elif m.user_tower.inputs != TOWER_INPUTS_LEXICAL:
        bad(
            "user_tower.inputs",
            f"must be {TOWER_INPUTS_LEXICAL} for a lexical_hybrid bundle, got {m.user_tower.inputs}",
        )
    if m.dim != lex.id_dim + lex.text_dim + 1:
        bad("dim", f"{m.dim}, but a lexical_hybrid row is id_dim + text_dim + 1 = {lex.id_dim + lex.text_dim + 1}")
    if lex.n_stat_items != m.n_trained_items:
        bad("lexical.n_stat_items", f"{lex.n_stat_items} differs from n_trained_items ({m.n_trained_items})")
    if m.cold_item.item_weights != "lexical" or any(e.item_weights != "lexical" for e in m.added_items):
        bad(
            "cold_item.item_weights", "must be 'lexical' (and so every added_items entry's) for a lexical_hybrid bundle"
        )
    named["lexical.item_side"] = lex.item_side
    tfidf_files = [f for f in m.files if f.startswith(lex.tfidf_dir + "/")]
    if not tfidf_files:
        bad("lexical.tfidf_dir", f"no file under {lex.tfidf_dir!r} is listed in 'files' (the fitted TF-IDF state)")


def _describe_input(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f" (got a JSON {'object' if isinstance(value, dict) else 'array'})"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


def _field_name(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a path: ("scorer", "k") -> scorer.k, ("files", "../x", "[key]") ->
    files['../x'] (the name)."""
    name = ""
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and not part.isidentifier() and part != "[key]"):
            name += f"[{part!r}]"
        elif part == "[key]":
            name += " (the name)"
        else:
            name += ("." if name else "") + part
    return name or "(top level)"


def validate_manifest(data: Any, source: str | Path = MANIFEST) -> BundleManifest:
    """``data`` (a parsed ``laser_export.json``, format 2 or, upgraded by :func:`upgrade_manifest`, 1) as a
    :class:`BundleManifest`; a :class:`BundleError` naming ``source`` and every bad field otherwise."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if _check_format_version(data, source) == 1:
        data = upgrade_manifest(data)
    try:
        return BundleManifest.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            if err["type"] == "value_error" and not err["loc"]:  # the cross-field check: already "field 'x': ..."
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            msg = {"missing": "missing", "extra_forbidden": "unknown field (not part of the manifest format)"}.get(
                err["type"], err["msg"].removeprefix("Value error, ")
            )
            shown = "" if err["type"] in ("missing", "extra_forbidden") else _describe_input(err.get("input"))
            problems.append(f"field {_field_name(err['loc'])!r}: {msg}{shown}")
        hint = ""
        if any(err["type"] == "missing" for err in exc.errors()):
            hint = (
                f" (missing fields: the bundle may be of an older format than {_reader()} reads; re-export the model)"
            )
        raise BundleError(f"{source}: invalid manifest: " + "; ".join(problems) + hint) from None


def upgrade_manifest(data: dict) -> dict:
    """A format-1 manifest (``data``, parsed JSON) as format 2: the fields format 2 requires and format 1 wrote
    only in later releases get the values a format-1 reader gave their absence: ``bitune.fusion`` ``"none"``,
    ``ann_index`` null (``calibration`` null), ``cold_item.item_weights`` ``"item_side"`` when the tower has an
    ``item_side`` input, else ``"user_side"`` (an export from before the item side was kept; ``"shared"`` was
    always written), its note from :data:`COLD_ITEM_WEIGHTS`, and each ``added_items`` entry the bundle's weights
    (the tower does not change when items are added). The result is validated as any format-2 manifest."""
    out = json.loads(json.dumps(data))  # a deep copy
    out["format_version"] = 2
    if not (isinstance(out.get("bitune"), dict) and isinstance(out.get("cold_item"), dict)):
        return out  # malformed: the model names the field
    out["bitune"].setdefault("fusion", "none")
    out.setdefault("ann_index", None)
    if isinstance(out["ann_index"], dict):
        out["ann_index"].setdefault("calibration", None)
    tower = out.get("user_tower")
    inputs = tower.get("inputs") if isinstance(tower, dict) else None
    cold = out["cold_item"]
    if cold.get("item_weights") is None:
        cold["item_weights"] = "item_side" if isinstance(inputs, list) and ITEM_SIDE in inputs else "user_side"
    if cold.get("item_weights_note") is None and cold["item_weights"] in COLD_ITEM_WEIGHTS:
        cold["item_weights_note"] = COLD_ITEM_WEIGHTS[cold["item_weights"]]
    for entry in out.get("added_items") or []:
        if isinstance(entry, dict) and entry.get("item_weights") is None:
            entry["item_weights"] = cold["item_weights"]
    return out


def _reader() -> str:
    from laser_core import __version__

    return f"laser {__version__}"


#: the format versions this reader loads: the current one, and the older ones :func:`upgrade_manifest` upgrades
READABLE_VERSIONS = (1, FORMAT_VERSION)


def _check_format_version(data: dict, source: str | Path) -> int | None:
    """The bundle's format version when this reader loads it (:data:`READABLE_VERSIONS`); a clear refusal of
    another one: older (or from before ``format_version``), or newer."""
    if data.get("format") != "laser-export":
        return None  # not a Laser bundle at all: the model's "field 'format'" error says so
    version = data.get("format_version")
    if type(version) is int and version in READABLE_VERSIONS:
        return version
    said = (
        f"format_version {version!r} is not supported: {_reader()} reads format_versions "
        f"{READABLE_VERSIONS[0]} to {FORMAT_VERSION}, and"
    )
    if "format_version" not in data or (type(version) is int and version < READABLE_VERSIONS[0]):
        raise BundleError(f"{source}: {said} the bundle is of an older format; re-export the model with this laser")
    if type(version) is int:
        raise BundleError(f"{source}: {said} the bundle is of a newer format; upgrade laser to load it")
    raise BundleError(f"{source}: {said} the value is not an integer")


def _read_json(bundle_dir: str | Path) -> tuple[Path, Any]:
    path = Path(bundle_dir) / MANIFEST
    if path.is_symlink():
        raise BundleError(f"{path}: a symbolic link (to {os.readlink(path)}); a bundle holds regular files only")
    if not path.is_file():
        raise BundleError(f"{path} not found: not a Laser export bundle")
    try:
        return path, json.loads(path.read_text(encoding="utf8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: malformed JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{path}: malformed JSON (nested too deeply)") from None


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    """``laser_export.json`` of a bundle as a :class:`BundleManifest` (a :class:`BundleError` if it is not one)."""
    path, data = _read_json(bundle_dir)
    return validate_manifest(data, path)


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> BundleManifest:
    """Write ``manifest`` (a :class:`BundleManifest`, e.g. edited with ``model_copy(update=...)``, which does not
    validate) as ``laser_export.json`` with ``files`` refilled (sha256 of every other file in the bundle), after
    validating it again as the loader will read it back: a bundle that would not load is never written.
    Returns the manifest written."""
    if not isinstance(manifest, BundleManifest):
        raise TypeError(f"write_manifest takes a BundleManifest, got {type(manifest).__name__}")
    root = Path(bundle_dir)
    path = root / MANIFEST
    # a Laser bundle is written without the two lexical-hybrid fields, so that it reads as before them
    exclude = {"model_kind", "lexical"} if manifest.model_kind == "laser" else None
    data = {**manifest.model_dump(mode="json", warnings="error", exclude=exclude), "files": files_sha256(root)}
    written = validate_manifest(data, path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf8")
    tmp.replace(path)
    return written


# ------------------------------------------------------------------------------------------------- files
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every file of the bundle but its manifest (:func:`bundle_files`), by POSIX path."""
    return {rel: sha256_file(Path(bundle_dir) / rel) for rel in bundle_files(bundle_dir)}


def bundle_files(bundle_dir: str | Path) -> list[str]:
    """Every file under ``bundle_dir`` but its manifest, as sorted POSIX paths relative to it."""
    root = Path(bundle_dir)
    return sorted(
        rel for rel in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if rel != MANIFEST
    )


def check_inside(bundle_dir: str | Path) -> None:
    """Every path under the bundle folder, file or folder, is a regular file or folder of its own: no symbolic
    link (pointing out of the bundle or not: a bundle is refused, never half-read), no FIFO, socket or device. So
    every path the manifest names resolves inside the folder (the folder itself may be reached through a link)."""
    root = Path(bundle_dir)
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow links to folders
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise BundleError(
                    f"{path}: a symbolic link (to {os.readlink(path)}); a bundle holds regular files and folders "
                    f"only, so that nothing outside it is read"
                )
            if not (path.is_dir() or path.is_file()):
                raise BundleError(f"{path}: not a regular file or folder (a bundle holds no FIFO, socket or device)")


def verify_bundle(bundle_dir: str | Path, manifest: BundleManifest | None = None, hashes: bool = True) -> None:
    """Every path of the bundle is a regular file or folder inside it (:func:`check_inside`: no symbolic link),
    every file (but the manifest) is listed in the manifest's ``files`` and every listed file exists; with
    ``hashes``, each one's sha256 matches. Every loader goes through here (``Recommender.load``,
    ``ExportBundle.load``, ``add_items``, ``index_bundle``)."""
    root = Path(bundle_dir)
    manifest = manifest or load_manifest(root)
    check_inside(root)
    listed = manifest.files
    present = bundle_files(root)
    unlisted = [name for name in present if name not in listed]
    if unlisted:
        raise BundleError(
            f"{root / unlisted[0]}: in the bundle folder but not listed in {MANIFEST} 'files' (every "
            f"bundle file must be listed with its sha256; unlisted: {unlisted[:10]})"
        )
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} 'files' but missing")
        if hashes and sha256_file(path) != digest:
            raise BundleError(f"{path}: sha256 differs from {MANIFEST} 'files' (the file was changed or corrupted)")


# ---------------------------------------------------------------------------------------- loaded contents
def _static_dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in (shape or [])]


def check_loaded(root: Path, manifest: BundleManifest, catalogue: Any, scorer: Any, tower: Any | None) -> None:
    """The loaded files agree with the manifest: catalogue columns and rows, the scorer's table shape, k and
    width, the user tower's inputs and width (``scorer``/``tower``: onnxruntime sessions)."""
    n_items, dim, k = manifest.n_items, manifest.dim, manifest.k
    cat_path = root / manifest.catalogue.file
    if list(catalogue.columns) != manifest.catalogue.columns:
        raise BundleError(
            f"{cat_path}: columns {list(catalogue.columns)} differ from the manifest's "
            f"catalogue.columns {manifest.catalogue.columns}"
        )
    scorer_path = root / manifest.scorer.file
    shape = scorer_table_shape(scorer_path)
    if shape != (n_items, dim):
        raise BundleError(
            f"{scorer_path}: item table is {list(shape)}, but the manifest says [n_items, dim] = [{n_items}, {dim}]"
        )
    inputs = {i.name: _static_dims(i.shape) for i in scorer.get_inputs()}
    outputs = {o.name: _static_dims(o.shape) for o in scorer.get_outputs()}
    if list(inputs) != ["user_embedding"] or sorted(outputs) != ["indices", "scores"]:
        raise BundleError(
            f"{scorer_path}: inputs {list(inputs)} / outputs {sorted(outputs)} are not a Laser "
            f"scorer's (user_embedding -> scores, indices)"
        )
    if inputs["user_embedding"][1:] not in ([dim], [None]):
        raise BundleError(
            f"{scorer_path}: input width {inputs['user_embedding'][1:]} differs from the manifest's dim={dim}"
        )
    if outputs["scores"][1:] not in ([k], [None]):
        raise BundleError(f"{scorer_path}: returns top-{outputs['scores'][1]}, but the manifest says k={k}")
    if tower is None:
        return
    if manifest.lexical is not None:
        check_lexical_files(root, manifest)
    tower_path = root / manifest.user_tower.file
    names = [i.name for i in tower.get_inputs()]
    if sorted(names) != sorted(manifest.user_tower.inputs):
        raise BundleError(
            f"{tower_path}: inputs {names} differ from the manifest's user_tower.inputs {manifest.user_tower.inputs}"
        )
    tower_out = {o.name: _static_dims(o.shape) for o in tower.get_outputs()}
    if "user_embedding" not in tower_out:
        raise BundleError(f"{tower_path}: no 'user_embedding' output (outputs: {sorted(tower_out)})")
    if tower_out["user_embedding"][1:] not in ([dim], [None]):
        raise BundleError(
            f"{tower_path}: output width {tower_out['user_embedding'][1:]} differs from the manifest's dim={dim}"
        )


def check_lexical_files(root: Path, manifest: BundleManifest) -> None:
    """A lexical-hybrid bundle's own files agree with its manifest: the tower's text table is
    ``[n_items, text_dim]`` and the item-side statistics (``lexical.item_side``) are finite float32 vectors of
    the widths the manifest says."""
    lex = manifest.lexical
    tower_path = root / manifest.user_tower.file
    shape = tuple(int(d) for d in _initializer(tower_path, TOWER_TEXT_TABLE, with_data=False).dims)
    if shape != (manifest.n_items, lex.text_dim):
        raise BundleError(
            f"{tower_path}: text table is {list(shape)}, but the manifest says [n_items, lexical.text_dim] = "
            f"[{manifest.n_items}, {lex.text_dim}]"
        )
    stats = read_lexical_item_side(root / lex.item_side)
    want = {"id_mean": lex.id_dim, "text_mean": lex.text_dim, "unknown_id": lex.id_dim}
    for name, width in want.items():
        if stats[name].shape != (width,):
            raise BundleError(
                f"{root / lex.item_side}: {name!r} has shape {list(stats[name].shape)}, the manifest says [{width}]"
            )


def read_lexical_item_side(path: Path) -> dict[str, np.ndarray]:
    """``lexical/item_side.safetensors``: ``id_mean``, ``text_mean``, ``unknown_id`` (float32, finite)."""
    from safetensors.numpy import load_file

    try:
        stats = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None
    for name in ("id_mean", "text_mean", "unknown_id"):
        value = stats.get(name)
        if value is None or value.dtype != np.float32 or value.ndim != 1 or not np.isfinite(value).all():
            raise BundleError(f"{path}: {name!r} missing or not a finite float32 vector")
    return stats


def augment_rows(rows: np.ndarray, norm_bound: float) -> np.ndarray:
    """``[rows, sqrt(norm_bound^2 - ||row||^2)] / norm_bound``: unit rows whose cosine with ``[u, 0]`` is
    ``u . row / (||u|| norm_bound)``, so the cosine scorer and the ANN index rank a dot-product model exactly
    (the lexical hybrid's table). Every row's norm must be at most ``norm_bound``."""
    rows = np.asarray(rows, dtype=np.float64)
    sq = (rows**2).sum(axis=1)
    bound = float(norm_bound) ** 2
    if (sq > bound * (1 + 1e-6)).any():
        raise ValueError(f"a row's norm {np.sqrt(sq.max()):.6g} exceeds the bound {norm_bound:.6g}")
    extra = norm_column(sq, bound)[:, None]
    return (np.concatenate([rows, extra], axis=1) / float(norm_bound)).astype(np.float32)


def replace_tower_text_table(src: Path, dst: Path, table: np.ndarray) -> None:
    """Write the lexical tower ``src`` to ``dst`` with its text table (initializer :data:`TOWER_TEXT_TABLE`)
    replaced by ``table`` ``[n_items, text_dim]`` (items added to a lexical bundle: their text rows)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == TOWER_TEXT_TABLE:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(table, dtype=np.float32), TOWER_TEXT_TABLE))
            break
    else:
        raise BundleError(f"{src}: no {TOWER_TEXT_TABLE!r} initializer (not a lexical hybrid's tower)")
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(model)


def read_tower_text_table(path: Path) -> np.ndarray:
    """The lexical tower's text table ``[n_items, text_dim]``."""
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(_initializer(path, TOWER_TEXT_TABLE, with_data=True)), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ scorer
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by ``max(||row||_2, eps)`` (torch.nn.functional.normalize's definition)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=-1, keepdims=True)).astype(np.float32)
    return x / np.maximum(norm, np.float32(eps))


def as_float_matrix(table: Any, name: str = "table") -> np.ndarray:
    """``table`` (an array or a torch tensor) as a finite, non-empty float32 ``[n, d]`` matrix."""
    if hasattr(table, "detach"):  # a torch tensor, without importing torch here
        table = table.detach().cpu().float().numpy()
    arr = np.asarray(table, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [n_items, d] matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    return arr


EXTERNAL_DATA_BYTES = 1 << 30  # tables larger than 1 GiB are stored as ONNX external data


def export_scorer(table: Any, path: str | Path, k: int = 10) -> Path:
    """Write the top-k cosine scorer over ``table`` ([n_items, d] array or tensor) as an ONNX model.

    The L2-normalized table is an initializer. Input ``user_embedding`` float32 ``[batch, d]`` (dynamic
    batch) is L2-normalized in the graph (``x / max(||x||, 1e-12)``); outputs ``scores`` float32 ``[batch, k]``
    (cosines, descending) and ``indices`` int64 ``[batch, k]`` (table rows), from ``TopK(largest, sorted)``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    arr = as_float_matrix(table)
    n_items, dim = arr.shape
    if k > n_items:
        raise ValueError(f"k={k} exceeds the number of items in the table ({n_items})")
    normed_t = np.ascontiguousarray(l2_normalize(arr).T)  # [d, n_items]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = normed_t.nbytes >= EXTERNAL_DATA_BYTES
    if external:  # protobuf cannot hold 2 GiB: the table is raw float32 in "<name>.data" beside the graph
        data_file = path.name + ".data"
        normed_t.astype("<f4", copy=False).tofile(path.parent / data_file)
        table_init = TensorProto(
            name=SCORER_TABLE,
            data_type=TensorProto.FLOAT,
            dims=list(normed_t.shape),
            data_location=TensorProto.EXTERNAL,
        )
        for key, value in (("location", data_file), ("offset", "0"), ("length", str(normed_t.nbytes))):
            entry = table_init.external_data.add()
            entry.key, entry.value = key, value
    else:
        table_init = numpy_helper.from_array(normed_t, SCORER_TABLE)
    inits = [
        table_init,
        numpy_helper.from_array(np.array([int(k)], dtype=np.int64), "k"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceL2", ["user_embedding"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_clamped"]),
        helper.make_node("Div", ["user_embedding", "norm_clamped"], ["user_normed"]),
        helper.make_node("MatMul", ["user_normed", SCORER_TABLE], ["cosines"]),
        helper.make_node("TopK", ["cosines", "k"], ["scores", "indices"], axis=-1, largest=1, sorted=1),
    ]
    graph = helper.make_graph(
        nodes,
        "laser_scorer",
        inputs=[helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["batch", dim])],
        outputs=[
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", int(k)]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", int(k)]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", SCORER_OPSET)],
        producer_name="laser",
        doc_string=f"Laser top-{k} cosine scorer over {n_items} items",
    )
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime releases too
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path) if external else model, full_check=not external)
    return path


def _initializer(path: str | Path, name: str, with_data: bool) -> Any:
    """The initializer ``name`` of the ONNX graph ``path`` (its data loaded only ``with_data``)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=with_data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None
    for init in model.graph.initializer:
        if init.name == name:
            return init
    what = "a Laser scorer" if name == SCORER_TABLE else "a lexical hybrid's tower"
    raise BundleError(f"{path}: no {name!r} initializer (not {what})")


def _scorer_table(path: str | Path, with_data: bool) -> Any:
    """The scorer's ``item_table_t`` initializer (its data loaded only ``with_data``)."""
    return _initializer(path, SCORER_TABLE, with_data)


def scorer_table_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the scorer's item table ``[n_items, d]`` (read from the graph, not the weights' data)."""
    return tuple(int(d) for d in reversed(_scorer_table(path, with_data=False).dims))  # stored as [d, n_items]


def read_scorer_table(path: str | Path) -> np.ndarray:
    """The normalized item table ``[n_items, d]`` baked into a scorer written by :func:`export_scorer`."""
    from onnx import numpy_helper

    return np.ascontiguousarray(numpy_helper.to_array(_scorer_table(path, with_data=True)).T.astype(np.float32))


# ------------------------------------------------------------------------------------------ item texts
def bound_item_texts(items: Any, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Any:
    """``items`` (a DataFrame with title, brand, category) with every field longer than ``max_chars`` characters
    cut to it (``truncate``: at a word boundary when possible), a copy when any was cut: the bound every item
    text has before it is formatted and tokenized, in export, in ``add_items`` and in a loaded catalogue (the
    data loader cuts to the same default, ``dataset.max_text_chars``). The template's own budget
    (``text.title_max_tokens`` ...) applies after; this one holds when the config sets none, so a 1 MB title
    never reaches the tokenizer or the tower whole."""
    return cut_item_texts(items, max_chars)[0]


# ------------------------------------------------------------------------------------------- tokenizer
def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied by its decode when the tokenizer asks for it)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class ServingTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, with the ``encode``/``decode`` calls that
    :class:`TextFormatter` makes (the same ids and texts as the transformers tokenizer; checked at export)."""

    def __init__(self, tokenizer: Any, clean_up_tokenization_spaces: bool = False) -> None:
        self._tok = tokenizer
        self.clean_up = bool(clean_up_tokenization_spaces)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up else text


def load_tokenizer(path: str | Path, clean_up_tokenization_spaces: bool = False) -> ServingTokenizer:
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise BundleError(f"{path}: not a readable tokenizers file ({exc})") from exc
    return ServingTokenizer(tok, clean_up_tokenization_spaces)


# ------------------------------------------------------------------------------------------- the artifact
@dataclass
class ExportBundle:
    """A bundle folder, written by :func:`laser_core.export.export_bundle`: the pipeline's artifact for it
    (``steps.materializers.ExportBundleMaterializer`` stores it with :meth:`save` and :meth:`load`)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def manifest(self) -> BundleManifest:
        """The validated manifest (a :class:`BundleError` for a folder that is no bundle of this format)."""
        return load_manifest(self.path)

    def verify(self, hashes: bool = True) -> BundleManifest:
        """The manifest, after checking every file of the folder against it (:func:`verify_bundle`)."""
        manifest = self.manifest
        verify_bundle(self.path, manifest, hashes=hashes)
        return manifest

    def files(self) -> list[Path]:
        """Every file in the bundle (its manifest too), relative to its folder, sorted."""
        return sorted(p.relative_to(self.path) for p in self.path.rglob("*") if p.is_file())

    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files())

    def save(self, directory: str | Path) -> Path:
        """Copy the bundle's files into ``directory`` (created if absent)."""
        out = Path(directory)
        for rel in self.files():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path / rel, out / rel)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ExportBundle:
        """The bundle in ``directory``, its manifest validated and its file list checked (not the hashes: serving
        checks those when it loads the bundle). A bundle of an older format is a :class:`BundleError` saying so."""
        bundle = cls(directory)
        bundle.verify(hashes=False)
        return bundle
