"""The export bundle's manifest (``laser_export.json``): one pydantic model, checked on write and on load.

:class:`BundleManifest` is the only description of the manifest: :func:`laser_core.export.write_manifest`
validates what it writes with it, and :func:`read_manifest` validates what the loader reads. Types are strict
(``"10"`` or ``10.0`` is not an integer, ``1`` is not a boolean), unknown fields are rejected everywhere except
inside ``metadata`` (free JSON from the exporter, e.g. ``model_version``), and the fields must agree with each
other (``k <= n_items``, the scorer's ``k`` is the bundle's, ``added_items`` account for the rows past
``n_trained_items``, every file the manifest names is listed in ``files`` ...).

:func:`verify_bundle` checks the folder against ``files``: every file of the bundle (but the manifest) must be
listed, every listed file must exist, and (``hashes=True``) match its sha256. :func:`check_loaded` checks what
only the loaded files can tell: the catalogue's columns and rows, the scorer's table shape and top-k, the user
tower's inputs and width. Every failure is a :class:`BundleError` naming the file and the field.

This module is torch-free (serving imports it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

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

from laser_core.data.text import TextConfig
from laser_core.export import (
    COLD_ITEM,
    COLD_ITEM_WEIGHTS,
    FORMAT_VERSION,
    ITEM_COLUMNS,
    ITEM_SIDE,
    MANIFEST,
    sha256_file,
)

TOWER_INPUTS_MFORMER = ["item_ids", "item_mask", "input_ids", "attention_mask"]
TOWER_INPUTS_TEXT = ["input_ids", "attention_mask"]


class BundleError(RuntimeError):
    """A bundle is missing a file, holds a file its manifest does not list, has a malformed or inconsistent
    manifest, or a file whose sha256 does not match."""


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
ColdItemWeights = Annotated[str, AfterValidator(_cold_item_weights)]  # laser_core.export.COLD_ITEM_WEIGHTS
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
    fusion: Literal["none", "concat"] = "none"  # bundles before the fusion variant have no such key


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
    # which weights embed new items (laser_core.export.COLD_ITEM_WEIGHTS); absent in bundles from before it
    item_weights: ColdItemWeights | None = None
    item_weights_note: Name | None = None


class AddedItemsEntry(_Section):
    n: PositiveInt
    first_row: NonNegativeInt
    source_manifest_sha256: Sha256
    item_weights: ColdItemWeights | None = None  # the bundle's cold_item weights when the items were added


# ---------------------------------------------------------------------------------------------- manifest
class BundleManifest(_Section):
    """``laser_export.json`` (layout in ``docs/serving.md``)."""

    format: Literal["laser-export"]
    format_version: Literal[1]
    created_by: Name
    k: PositiveInt
    dim: PositiveInt
    n_items: PositiveInt
    n_trained_items: PositiveInt
    text: TextConfig
    sr: SRSection | None
    bitune: BiTuneSection
    backbone: BackboneSection
    tokenizer: TokenizerSection
    scorer: ScorerSection
    user_tower: UserTowerSection | None
    parity_max_abs_diff: Annotated[float, Field(ge=0)] | None
    catalogue: CatalogueSection
    popularity: bool
    cold_item: ColdItemSection
    added_items: list[AddedItemsEntry]
    metadata: dict[str, JsonValue]  # free JSON from the exporter: the one place where any key is allowed
    files: dict[BundlePath, Sha256] = Field(min_length=1)

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
    fusion = m.bitune.fusion != "none"
    mformer = m.bitune.prefix == "mformer" or fusion  # the tower reads the item-id history
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
        if ITEM_SIDE in m.user_tower.inputs and m.cold_item.item_weights not in (None, "item_side") and not fusion:
            bad(
                "cold_item.item_weights",
                f"the user tower has an {ITEM_SIDE!r} input, so it must be 'item_side', "
                f"got {m.cold_item.item_weights!r}",
            )
    columns = [*ITEM_COLUMNS, *(["popularity"] if m.popularity else [])]
    if m.catalogue.columns != columns:
        bad("catalogue.columns", f"must be {columns} (popularity={m.popularity}), got {m.catalogue.columns}")
    if m.cold_item.item_id != COLD_ITEM:
        bad("cold_item.item_id", f"must be {COLD_ITEM}, got {m.cold_item.item_id}")
    if not m.tokenizer.file.startswith(m.tokenizer.dir + "/"):
        bad("tokenizer.file", f"{m.tokenizer.file!r} is not inside tokenizer.dir {m.tokenizer.dir!r}")
    named = {"scorer.file": m.scorer.file, "catalogue.file": m.catalogue.file, "tokenizer.file": m.tokenizer.file}
    if m.user_tower is not None:
        named["user_tower.file"] = m.user_tower.file
    for field, name in named.items():
        if name not in m.files:
            bad(field, f"{name!r} is not listed (with its sha256) in 'files'")
    version = m.metadata.get("model_version")
    if "model_version" in m.metadata and not (isinstance(version, str) and version.strip()):
        bad("metadata.model_version", f"must be a non-empty string, got {version!r}")
    return out


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
    """``data`` (a parsed ``laser_export.json``) as a :class:`BundleManifest`; a :class:`BundleError` naming
    ``source`` and every bad field otherwise."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if "format_version" in data and not (type(version) is int and version == FORMAT_VERSION):
        raise BundleError(f"{source}: format_version {version!r} is not supported (this laser reads {FORMAT_VERSION})")
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
        raise BundleError(f"{source}: invalid manifest: " + "; ".join(problems)) from None


def read_manifest(bundle_dir: str | Path) -> dict:
    """``laser_export.json`` of a bundle, validated by :class:`BundleManifest` (returned as the parsed dict)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: not a Laser export bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: malformed JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{path}: malformed JSON (nested too deeply)") from None
    validate_manifest(manifest, path)
    return manifest


# ------------------------------------------------------------------------------------------------- files
def bundle_files(bundle_dir: str | Path) -> list[str]:
    """Every file under ``bundle_dir`` but its manifest, as sorted POSIX paths relative to it."""
    root = Path(bundle_dir)
    return sorted(
        rel for rel in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if rel != MANIFEST
    )


def verify_bundle(bundle_dir: str | Path, manifest: dict | None = None, hashes: bool = True) -> None:
    """Every file of the bundle is listed in the manifest's ``files`` and every listed file exists; with
    ``hashes``, each one's sha256 matches."""
    root = Path(bundle_dir)
    manifest = manifest or read_manifest(root)
    listed = manifest["files"]
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
def scorer_table_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the scorer's item table ``[n_items, d]`` (read from the graph, not the weights' data)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None
    for init in model.graph.initializer:
        if init.name == "item_table_t":
            return tuple(int(d) for d in reversed(init.dims))  # stored transposed: [d, n_items]
    raise BundleError(f"{path}: no 'item_table_t' initializer (not a Laser scorer)")


def _static_dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in (shape or [])]


def check_loaded(root: Path, manifest: dict, catalogue: Any, scorer: Any, tower: Any | None) -> None:
    """The loaded files agree with the manifest: catalogue columns and rows, the scorer's table shape, k and
    width, the user tower's inputs and width (``scorer``/``tower``: onnxruntime sessions)."""
    n_items, dim, k = manifest["n_items"], manifest["dim"], manifest["k"]
    cat_path = root / manifest["catalogue"]["file"]
    if list(catalogue.columns) != manifest["catalogue"]["columns"]:
        raise BundleError(
            f"{cat_path}: columns {list(catalogue.columns)} differ from the manifest's "
            f"catalogue.columns {manifest['catalogue']['columns']}"
        )
    scorer_path = root / manifest["scorer"]["file"]
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
    tower_path = root / manifest["user_tower"]["file"]
    names = [i.name for i in tower.get_inputs()]
    if sorted(names) != sorted(manifest["user_tower"]["inputs"]):
        raise BundleError(
            f"{tower_path}: inputs {names} differ from the manifest's user_tower.inputs "
            f"{manifest['user_tower']['inputs']}"
        )
    tower_out = {o.name: _static_dims(o.shape) for o in tower.get_outputs()}
    if "user_embedding" not in tower_out:
        raise BundleError(f"{tower_path}: no 'user_embedding' output (outputs: {sorted(tower_out)})")
    if tower_out["user_embedding"][1:] not in ([dim], [None]):
        raise BundleError(
            f"{tower_path}: output width {tower_out['user_embedding'][1:]} differs from the manifest's dim={dim}"
        )
