"""Exporting a trained Laser model as a self-contained ONNX bundle (served by :mod:`laser_core.serving`).

This module is the writer's torch side: the float32 reference model, the traced user tower and its parity
check, :func:`export_bundle`. The format itself (file names, the manifest, the scorer graph, the tokenizer file)
is :mod:`laser_core.bundle`. torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# interaction counts per item for the popularity fallback: the one implementation, importable from here too
from laser_core.ranking import popularity_counts as popularity_from_sequences  # noqa: F401

from laser_core.bundle import (
    CATALOGUE,
    COLD_ITEM,
    COLD_ITEM_TREATMENT,
    COLD_ITEM_WEIGHTS,
    FORMAT_VERSION,
    ITEM_COLUMNS,
    ITEM_SIDE,
    SCORER,
    SCORER_OPSET,
    TOKENIZER_DIR,
    USER_TOWER,
    BackboneSection,
    BiTuneSection,
    BundleManifest,
    CatalogueSection,
    ColdItemSection,
    ScorerSection,
    SRSection,
    TokenizerSection,
    UserTowerSection,
    as_float_matrix,
    bound_item_texts,
    export_scorer,
    load_tokenizer,
    write_manifest,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from laser_core.model import LaserModel, LaserWeights
    from laser_core.sr.base import SequentialRecommender


class ExportError(RuntimeError):
    """An export cannot be written as asked (a setting the exporter does not support, a failed self-check)."""


# ------------------------------------------------------------------------------------------ torch side
def float_backbone(config, texts=None):
    """A fresh float32 load of ``config``'s backbone for export: unquantized when ``quantization`` is
    ``none``; otherwise loaded quantized exactly as in training, then dequantized to float32, so the exported
    weights are the ones the 4-/8-bit model computed with (bitsandbytes can not be exported)."""
    import torch

    from laser_core.llm.backbones import Backbone, BackboneConfig, load_backbone

    cfg = config if isinstance(config, BackboneConfig) else BackboneConfig.model_validate(config or {})
    cfg = cfg.model_copy(update={"compute_dtype": "float32", "gradient_checkpointing": False})
    backbone = load_backbone(cfg, texts=texts)
    model = backbone.model
    if cfg.quantization != "none":
        model = model.dequantize(dtype=torch.float32)
    model = model.float().cpu().eval()  # the export traces on CPU
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(model=model, tokenizer=backbone.tokenizer, path=backbone.path, config=cfg)


def reference_model(weights: LaserWeights, sr_model: SequentialRecommender | None, items: pd.DataFrame) -> LaserModel:
    """The torch :class:`~laser_core.model.LaserModel` that ``user_tower.onnx`` computes: the trained weights
    on :func:`float_backbone`, in eval mode (float32, CPU; no bitsandbytes). ``sr_model`` is copied, never
    changed."""
    import copy

    import torch

    from laser_core.data.text import TextConfig, TextFormatter
    from laser_core.llm.backbones import TINY
    from laser_core.model import LaserModel

    spec = weights.spec
    texts = None
    if spec.backbone.name in TINY:  # the tokenizer is trained on the item texts, as build_laser does
        plain: TextConfig = spec.text.model_copy(update={"title_max_tokens": None, "category_max_tokens": None})
        fmt = TextFormatter(items, plain)
        texts = [fmt.item_text(i) for i in range(len(items))]
    backbone = float_backbone(spec.backbone, texts)
    formatter = TextFormatter(items, spec.text, tokenizer=backbone.tokenizer)
    torch.manual_seed(spec.seed)
    needs_sr = spec.bitune.reads_item_ids
    sr = copy.deepcopy(sr_model).float().cpu().eval() if needs_sr else None
    model = LaserModel(backbone, sr, formatter, spec.bitune)
    model.load_state_dict({k: v.detach().float().cpu() for k, v in weights.state.items()})
    if weights.item_state is not None:  # the weights that made the item table: the tower's item side
        model.set_item_state({k: v.detach().float().cpu() for k, v in weights.item_state.items()})
    model.eval()
    model.llm.eval()  # no bitsandbytes here, so plain eval mode (LaserModel.train keeps the LLM in train())
    return model


def _tower_module(model: LaserModel):
    """The module ``user_tower.onnx`` is traced from. Inputs differ by prefix (only the M-Former reads item ids)
    and by whether the item side has its own weights (``item_side``; :meth:`LaserModel.set_item_state`)."""
    import torch

    from laser_core.collate import LaserBatch

    class Tower(torch.nn.Module):
        def __init__(self, laser: LaserModel) -> None:
            super().__init__()
            self.laser = laser
            # frozen parts kept outside the Laser model's module tree, registered here for the exporter
            self.sr = laser.sr
            self.llm = laser.llm
            self.item_weights = laser.item_weights

        def embed(self, item_ids, item_mask, input_ids, attention_mask, item_side) -> torch.Tensor:
            batch = LaserBatch(input_ids, attention_mask, item_ids, item_mask, item_side)  # the graph's inputs
            return self.laser(batch).user_embedding

    class MFormerTower(Tower):
        def forward(self, item_ids, item_mask, input_ids, attention_mask) -> torch.Tensor:
            return self.embed(item_ids, item_mask, input_ids, attention_mask, None)

    class MFormerItemSideTower(Tower):
        def forward(self, item_ids, item_mask, input_ids, attention_mask, item_side) -> torch.Tensor:
            return self.embed(item_ids, item_mask, input_ids, attention_mask, item_side)

    class TextTower(Tower):
        def forward(self, input_ids, attention_mask) -> torch.Tensor:
            return self.embed(None, None, input_ids, attention_mask, None)

    class TextItemSideTower(Tower):
        def forward(self, input_ids, attention_mask, item_side) -> torch.Tensor:
            return self.embed(None, None, input_ids, attention_mask, item_side)

    towers = {
        (True, False): MFormerTower,
        (True, True): MFormerItemSideTower,
        (False, False): TextTower,
        (False, True): TextItemSideTower,
    }
    return towers[model.reads_item_ids, _has_item_side(model)](model).eval()


def _tower_inputs(model: LaserModel) -> list[str]:
    """``user_tower.onnx``'s input names, in order: :data:`laser_core.collate.TOWER_INPUTS` less the item ids
    (a model that does not read them) and ``item_side`` (one without an item side)."""
    from laser_core.collate import TOWER_INPUTS

    skip = {"item_ids", "item_mask"} if not model.reads_item_ids else set()
    return [n for n in TOWER_INPUTS if n not in skip and (n != ITEM_SIDE or _has_item_side(model))]


def _check_cold_items(sr_model: SequentialRecommender) -> None:
    """The M-Former export (and its cold-item treatment) needs an SR encoder with a cold-item embedding."""
    if sr_model.cold_item_embedding() is None:
        raise NotImplementedError(
            f"exporting the M-Former prefix needs an SR encoder with a cold-item embedding (SASRec, BERT4Rec), "
            f"not {type(sr_model).__name__} (setting sr.model)"
        )


def _has_item_side(model: LaserModel) -> bool:
    """Whether the tower has an ``item_side`` input: the item side has its own weights, or the model is fused
    (item rows and user rows are built differently)."""
    return model.item_weights is not None or model.config.fusion != "none"


def _catalogue(items: pd.DataFrame, n_rows: int, popularity: Any | None) -> pd.DataFrame:
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(f"items lacks columns {missing} (needs {list(ITEM_COLUMNS)})")
    if len(items) != n_rows:
        raise ValueError(
            f"items has {len(items)} rows but the table has {n_rows}: row i of items must describe table row i"
        )
    cat = pd.DataFrame({c: items[c].fillna("").astype(str).to_numpy() for c in ITEM_COLUMNS})
    dup = cat["item_id"][cat["item_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"items has duplicate item_id values: {dup[:10]}")
    if popularity is not None:
        if hasattr(popularity, "detach"):
            popularity = popularity.detach().cpu().numpy()
        pop = np.asarray(popularity, dtype=np.float64).reshape(-1)
        if len(pop) != n_rows or not np.isfinite(pop).all() or (pop < 0).any():
            raise ValueError(
                f"popularity must be {n_rows} finite non-negative numbers (one per table row), got {len(pop)}"
            )
        cat["popularity"] = pop
    return cat


def _tokenizer_info(tokenizer: Any, pad_id: int, eos_id: int) -> dict:
    """What serving needs to tokenize exactly as the torch model: the effective decode clean-up (transformers
    skips it for BPE models unless forced) and the padding id."""
    cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        cleanup
        and backend is not None
        and type(backend.model).__name__ == "BPE"
        and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    ):
        cleanup = False
    return {
        "dir": TOKENIZER_DIR,
        "file": f"{TOKENIZER_DIR}/tokenizer.json",
        "pad_token_id": int(pad_id),
        "eos_token_id": int(eos_id),
        "clean_up_tokenization_spaces": cleanup,
    }


def _sample_histories(n_items: int, max_len: int, history_len: int | None) -> list[list[int]]:
    """Histories for the export's self-check: variable lengths, a long one, and cold items."""
    rng = np.random.default_rng(0)
    long = max(max_len, history_len or 0) + 3
    lengths = [1, 2, min(5, long), long]
    hists = [rng.integers(0, n_items, size=n).tolist() for n in lengths]
    hists.append([COLD_ITEM, *hists[1]])  # a cold item inside a history
    hists.append([COLD_ITEM])  # a cold item alone (add_items)
    return hists


def _check_parity(
    tower_path: Path, model: LaserModel, histories: list[list[int]], token_ids: list[list[int]], input_names: list[str]
) -> float:
    import onnxruntime as ort
    import torch

    batch = model.collate(histories, token_ids, item_side=[len(h) == 1 for h in histories])  # one-item rows: items
    with torch.no_grad():
        expected = model(batch).user_embedding.numpy()
    sess = ort.InferenceSession(str(tower_path), providers=["CPUExecutionProvider"])
    got = sess.run(["user_embedding"], batch.feeds(input_names))[0]
    return float(np.abs(got - expected).max())


def export_user_tower(model: LaserModel, path: str | Path, opset: int = 18) -> dict:
    """Trace ``model`` (a float32 :func:`reference_model`) to ``user_tower.onnx`` with the dynamo exporter.

    Inputs (all int64, left-padded): ``item_ids``/``item_mask`` ``[B, L_sr]`` (M-Former prefix only;
    ``L_sr <= `` the SR max_len; id -1 at a visible position = a cold item), ``input_ids``/
    ``attention_mask`` ``[B, T]`` and, when the model's item side has its own weights
    (:meth:`LaserModel.set_item_state`), ``item_side`` ``[B]`` (1: embed the row with the item side's weights,
    as an item-table row; 0: the user side's); output ``user_embedding`` float32 ``[B, d]``. The graph holds
    the backbone once. Returns the tower's manifest entry (file, inputs, output, opset)."""
    import torch

    if model.reads_item_ids:
        _check_cold_items(model.sr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tower = _tower_module(model)
    hists = [[0, 1, 2], [3, 4]] if model.reads_item_ids else [[0], [1]]
    token_ids = [model._encode(model.formatter.user_text(h)) for h in hists]
    token_ids[1] = token_ids[1][: max(2, len(token_ids[1]) - 3)]  # different lengths: padding is traced
    example = model.collate(hists, token_ids, item_side=[1, 0]).to_torch()  # one row of each side
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    sr_len = torch.export.Dim("sr_len", min=1, max=model.sr.config.max_len) if model.reads_item_ids else None
    dims = {"item_ids": sr_len, "item_mask": sr_len, "input_ids": seq, "attention_mask": seq, ITEM_SIDE: None}
    names = _tower_inputs(model)
    args = tuple(getattr(example, n) for n in names)
    shapes = tuple({0: batch} if dims[n] is None else {0: batch, 1: dims[n]} for n in names)
    n_bytes = sum(p.numel() * p.element_size() for p in tower.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        # torch-internal deprecation noise and "axis name ... will not be used" notes from the exporter
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*The axis name.*", category=UserWarning)
        torch.onnx.export(
            tower,
            args,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=["user_embedding"],
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=n_bytes > (3 << 29),
            verbose=False,
        )
    return {
        "file": path.name,
        "inputs": names,
        "output": "user_embedding",
        "opset": opset,
        "external_data": n_bytes > (3 << 29),
    }


@contextmanager
def _new_bundle_folder(out: Path):
    """The bundle folder being written (created here): removed whole when anything fails, so a failed export
    never leaves a half-written bundle."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _finish_bundle(out: Path, manifest: BundleManifest, ann_index: bool) -> None:
    """The last steps of every export: the manifest (:func:`write_manifest` hashes the files and validates it)
    and, with ``ann_index``, the ANN index over the scorer's table."""
    write_manifest(out, manifest)
    if ann_index:
        from laser_core.ann import index_bundle

        index_bundle(out)


def export_bundle(
    weights: LaserWeights,
    sr_model: SequentialRecommender | None,
    items: pd.DataFrame,
    table: Any,
    out_dir: str | Path,
    k: int = 10,
    metadata: dict | None = None,
    user_tower: bool = True,
    *,
    popularity: Any | None = None,
    parity_tolerance: float = 1e-3,
    ann_index: bool = False,
) -> Path:
    """Write a serving bundle for a trained Laser model to ``out_dir`` (which must be empty or absent).

    ``weights``: the trained :class:`~laser_core.model.LaserWeights`; ``sr_model``: the frozen ID-based
    recommender (needed by the M-Former prefix); ``items``: the catalogue (item_id, title, brand, category),
    row i = table row i; ``table``: the item-embedding table ``[n_items, d]``; ``k``: the scorer's top-k;
    ``metadata``: free JSON (e.g. ``{"model_version": ...}``); ``popularity``: per-row interaction counts from
    the training data (enables the serving popularity fallback; see :func:`popularity_from_sequences`).

    The user tower is traced from a fresh float32 load of the backbone (dequantized when trained in 4/8 bits)
    and checked against that torch model on sample histories (variable lengths, cold items, item rows); a larger
    difference than ``parity_tolerance`` is an :class:`ExportError`. When ``weights.item_state`` holds the
    weights that made ``table`` (stage 2 trained on), the tower carries them as its item side (input
    ``item_side``), so new items are embedded as the table's rows were. ``ann_index``: also build an
    approximate-nearest-neighbour index over the table (``laser_core.ann.index_bundle``, default settings; needs
    the ``ann`` extra). Returns ``out_dir``.
    """
    from laser_core import __version__
    from laser_core.data.text import TextFormatter

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    arr = as_float_matrix(table)
    n_items, dim = arr.shape
    items = bound_item_texts(items)  # the bound serving keeps too (a no-op for a dataset from load_dataset)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an integer in 1..{n_items} (the number of items), got {k!r}")
    catalogue = _catalogue(items, n_items, popularity)
    metadata = dict(metadata or {})
    json.dumps(metadata)  # must be JSON; fail before the slow part
    spec = weights.spec
    cold_item_weights = weights.cold_item_weights()
    if cold_item_weights == "user_side":
        warnings.warn(
            "these stage-2 weights carry no item_state (the weights that made the item table): new items "
            "added to this bundle will be embedded with the user side's weights, not the table's; "
            "re-run the stage-2 step to keep them",
            UserWarning,
            stacklevel=2,
        )
    if spec.bitune.reads_item_ids:
        if sr_model is None:
            raise ValueError(
                f"prefix {spec.bitune.prefix!r} with fusion {spec.bitune.fusion!r} needs the frozen "
                "ID-based recommender (sr_model)"
            )
        _check_cold_items(sr_model)
    with _new_bundle_folder(out):
        model = reference_model(weights, sr_model, items)
        if model.embedding_size != dim:
            raise ValueError(f"the table's width {dim} differs from the model's embedding size {model.embedding_size}")
        tok_info = _tokenizer_info(
            model.tokenizer,
            model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.eos_id,
            model.eos_id,
        )
        model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        if not (out / tok_info["file"]).is_file():
            raise ExportError(
                f"the backbone's tokenizer has no fast (tokenizers) version: {tok_info['file']} was "
                f"not written, and serving reads only that file"
            )
        # serving formats and tokenizes without transformers: check it gives the torch model's token ids
        serving_tok = load_tokenizer(out / tok_info["file"], tok_info["clean_up_tokenization_spaces"])
        serving_fmt = TextFormatter(items, spec.text, tokenizer=serving_tok)
        for i in range(n_items):
            text = model.formatter.item_text(i)
            if serving_fmt.item_text(i) != text or serving_tok.encode(text) != model._encode(text):
                raise ExportError(
                    f"the saved tokenizer does not reproduce the model's text/token ids for item "
                    f"{catalogue['item_id'][i]!r} (row {i}): {text!r}"
                )
        export_scorer(arr, out / SCORER, k=int(k))
        tower_entry = None
        parity = None
        if user_tower:
            tower_entry = export_user_tower(model, out / USER_TOWER)
            sr_len = model.sr.config.max_len if model.sr is not None else 1
            hists = _sample_histories(n_items, sr_len, spec.text.history_len)
            if not model.reads_item_ids:
                hists = [h for h in hists if COLD_ITEM not in h]
            # the texts only need realistic lengths here: a history's known items (the first item for [cold])
            token_ids = [model._encode(model.formatter.user_text([i for i in h if i >= 0] or [0])) for h in hists]
            parity = _check_parity(out / USER_TOWER, model, hists, token_ids, tower_entry["inputs"])
            if not parity <= parity_tolerance:
                raise ExportError(f"{USER_TOWER} differs from the torch model by {parity:.3g} (> {parity_tolerance})")
        catalogue.to_parquet(out / CATALOGUE, index=False)
        # built unchecked: write_manifest fills `files` (hashing each file once) and validates the whole manifest
        manifest = BundleManifest.model_construct(
            format="laser-export",
            format_version=FORMAT_VERSION,
            created_by=f"laser {__version__}",
            k=int(k),
            dim=int(dim),
            n_items=int(n_items),
            n_trained_items=int(n_items),
            text=spec.text,
            sr=SRSection(model=sr_model.config.model, max_len=int(sr_model.config.max_len))
            if model.reads_item_ids
            else None,
            bitune=BiTuneSection(
                prefix=spec.bitune.prefix,
                pooling=spec.bitune.pooling,
                n_query=spec.bitune.mformer.n_query if spec.bitune.prefix != "none" else 0,
                n_experts=spec.bitune.mformer.n_experts if spec.bitune.prefix == "mformer" else 0,
                fusion=spec.bitune.fusion,
            ),
            backbone=BackboneSection(
                name=spec.backbone.name,
                trained_quantization=spec.backbone.quantization,
                exported_dtype="float32",
                exported_weights="unquantized"
                if spec.backbone.quantization == "none"
                else f"dequantized from {spec.backbone.quantization}",
            ),
            tokenizer=TokenizerSection(**tok_info),
            scorer=ScorerSection(
                file=SCORER, k=int(k), input="user_embedding", outputs=["scores", "indices"], opset=SCORER_OPSET
            ),
            user_tower=UserTowerSection(**tower_entry) if tower_entry else None,
            parity_max_abs_diff=None if parity is None else float(parity),
            catalogue=CatalogueSection(
                file=CATALOGUE,
                columns=list(catalogue.columns),
                row_order="row i of the catalogue is row i of the scorer's table (its indices)",
            ),
            popularity="popularity" in catalogue.columns,
            cold_item=ColdItemSection(
                item_id=COLD_ITEM,
                treatment=COLD_ITEM_TREATMENT,
                item_weights=cold_item_weights,
                item_weights_note=COLD_ITEM_WEIGHTS[cold_item_weights],
            ),
            added_items=[],
            metadata=metadata,
            files={},
            ann_index=None,
        )
        _finish_bundle(out, manifest, ann_index)
    return out


# ------------------------------------------------------------------------------------- the lexical hybrid
def _check_lexical_parity(tower_path: Path, model: Any, tolerance: float) -> float:
    """The largest difference between ``user_tower.onnx`` and the torch hybrid on sample histories (lengths 1 to
    past the window), relative to the rows' scale (at least 1)."""
    import onnxruntime as ort
    import torch

    from laser_core.bundle import COLD_ITEM

    hists = [h for h in _sample_histories(model.n_items, model.window, None) if COLD_ITEM not in h]
    batch = model.predict_inputs(hists)
    with torch.no_grad():
        expected = model(batch["item_ids"], batch["item_mask"]).numpy()
    sess = ort.InferenceSession(str(tower_path), providers=["CPUExecutionProvider"])
    got = sess.run(["user_embedding"], {k: v.numpy() for k, v in batch.items()})[0]
    diff = float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))
    if not diff <= tolerance:
        raise ExportError(f"{USER_TOWER} differs from the torch lexical hybrid by {diff:.3g} (> {tolerance})")
    return diff


def export_lexical_bundle(
    model: Any,
    items: pd.DataFrame,
    out_dir: str | Path,
    k: int = 10,
    metadata: dict | None = None,
    *,
    popularity: Any | None = None,
    parity_tolerance: float = 1e-4,
    ann_index: bool = False,
) -> Path:
    """Write a serving bundle for a fitted lexical hybrid (:class:`laser_core.lexical.LexicalHybrid`) to
    ``out_dir`` (empty or absent), in the format Laser's bundles have (``model_kind: lexical_hybrid``; layout in
    ``docs/serving.md``): ``user_tower.onnx`` (the item-id history -> the user row: the ID model, the text rows,
    the z-score statistics), ``scorer.onnx`` over the table (the centred item rows plus the column that makes
    their norms equal, :func:`laser_core.bundle.augment_rows`, so the cosine scorer and the ANN index rank the
    blend exactly), the catalogue, and ``lexical/`` (the fitted TF-IDF state and the item-side statistics, for
    ``laser items add``). The tower is checked against the torch model (``parity_tolerance``, relative).
    ``ann_index``: also build the ANN index (``laser_core.ann.index_bundle``). Returns ``out_dir``."""
    import torch
    from safetensors.numpy import save_file

    from laser_core import __version__
    from laser_core.bundle import (
        LEXICAL_COLD_ITEM_TREATMENT,
        LEXICAL_DIR,
        LEXICAL_ITEM_SIDE,
        TOWER_INPUTS_LEXICAL,
        LexicalSection,
        augment_rows,
    )

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    items = bound_item_texts(items)
    n_items = model.n_items
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an integer in 1..{n_items} (the number of items), got {k!r}")
    catalogue = _catalogue(items, n_items, popularity)
    metadata = dict(metadata or {})
    json.dumps(metadata)  # must be JSON; fail before the slow part
    model = model.cpu().eval()
    with torch.no_grad():
        rows = model.item_vectors().double().numpy()
    bound = float(np.sqrt((rows**2).sum(axis=1)).max()) or 1.0
    table = augment_rows(rows, bound)
    dim = table.shape[1]
    with _new_bundle_folder(out):
        export_scorer(table, out / SCORER, k=int(k))
        window = model.window
        example = model.predict_inputs([[0, 1, 2], [3]])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*The axis name.*", category=UserWarning)
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            torch.onnx.export(
                model,
                (example["item_ids"], example["item_mask"]),
                str(out / USER_TOWER),
                dynamo=True,
                input_names=TOWER_INPUTS_LEXICAL,
                output_names=["user_embedding"],
                dynamic_shapes=({0: batch}, {0: batch}),
                opset_version=18,
                verbose=False,
            )
        _rename_text_table(out / USER_TOWER, model.text_table.numpy())
        parity = _check_lexical_parity(out / USER_TOWER, model, parity_tolerance)
        model.tfidf_state.save(out / LEXICAL_DIR / "tfidf")
        save_file(
            {
                "id_mean": model.id_mean.numpy().astype(np.float32),
                "text_mean": model.text_mean.numpy().astype(np.float32),
                "unknown_id": model.unknown_id.numpy().astype(np.float32),
            },
            str(out / LEXICAL_ITEM_SIDE),
        )
        catalogue.to_parquet(out / CATALOGUE, index=False)
        manifest = BundleManifest.model_construct(
            format="laser-export",
            format_version=FORMAT_VERSION,
            created_by=f"laser {__version__}",
            k=int(k),
            dim=int(dim),
            n_items=int(n_items),
            n_trained_items=int(n_items),
            text=model.text_config,
            sr=SRSection(model=model.sr.config.model, max_len=int(window)),
            bitune=None,
            backbone=None,
            tokenizer=None,
            scorer=ScorerSection(
                file=SCORER, k=int(k), input="user_embedding", outputs=["scores", "indices"], opset=SCORER_OPSET
            ),
            user_tower=UserTowerSection(
                file=USER_TOWER,
                inputs=list(TOWER_INPUTS_LEXICAL),
                output="user_embedding",
                opset=18,
                external_data=False,
            ),
            parity_max_abs_diff=parity,
            catalogue=CatalogueSection(
                file=CATALOGUE,
                columns=list(catalogue.columns),
                row_order="row i of the catalogue is row i of the scorer's table (its indices)",
            ),
            popularity="popularity" in catalogue.columns,
            cold_item=ColdItemSection(
                item_id=COLD_ITEM,
                treatment=LEXICAL_COLD_ITEM_TREATMENT,
                item_weights="lexical",
                item_weights_note=COLD_ITEM_WEIGHTS["lexical"],
            ),
            added_items=[],
            metadata=metadata,
            files={},
            ann_index=None,
            model_kind="lexical_hybrid",
            lexical=LexicalSection(
                id_model=model.sr.config.model,
                form=model.form,
                gamma=model.gamma,
                id_dim=model.id_dim,
                text_dim=model.text_dim,
                norm_bound=bound,
                n_stat_items=int(n_items),
                tfidf=model.tfidf_state.config.model_dump(mode="json"),
                tfidf_dir=f"{LEXICAL_DIR}/tfidf",
                item_side=LEXICAL_ITEM_SIDE,
                valid={k_: float(v) for k_, v in model.valid.items()},
                blend="score(u, i) = z(id(u, .))_i + gamma * z(sim(u, .))_i, z per user over the trained catalogue "
                "(laser_core.hybrid.blend); served as the cosine of [u_id/sd_id, gamma*u_txt/sd_txt, 0] with the "
                "table's rows [v_id - mean_id, t - mean_txt, sqrt(norm_bound^2 - |.|^2)] / norm_bound",
            ),
        )
        _finish_bundle(out, manifest, ann_index)
    return out


def _rename_text_table(path: Path, table: np.ndarray) -> None:
    """Name the traced tower's text-table initializer :data:`laser_core.bundle.TOWER_TEXT_TABLE`, so that
    ``add_items`` finds it: the exporter's graph optimisation renames it, so it is found by its values
    (``table``)."""
    import onnx
    from onnx import numpy_helper

    from laser_core.bundle import TOWER_TEXT_TABLE

    graph = onnx.load(str(path))
    names = [
        i.name
        for i in graph.graph.initializer
        if tuple(i.dims) == table.shape and np.array_equal(numpy_helper.to_array(i), table)
    ]
    if len(names) != 1:
        raise ExportError(f"{path}: expected one initializer holding the text table in the traced tower, got {names}")
    old = names[0]
    if old == TOWER_TEXT_TABLE:
        return
    for init in graph.graph.initializer:
        if init.name == old:
            init.name = TOWER_TEXT_TABLE
    for node in graph.graph.node:
        node.input[:] = [TOWER_TEXT_TABLE if n == old else n for n in node.input]
    onnx.save_model(graph, str(path))
