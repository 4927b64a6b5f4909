"""Whole-model checkpoints of ``VARGPT``: our export, the released VARGPT-v1.1 folder, and init from parts.

* ``save_pretrained`` / ``from_pretrained``: our export is a folder with ``config.json`` (the full ``VARGPTConfig``
  under ``"vargpt"``, with ``"format": "vargpt-lightning"``), sharded safetensors in our parameter names, and the
  text tokenizer's files. ``from_pretrained`` also reads the released VARGPT-v1.1 folder (VARGPT §6), recognised by
  its weight names (``vargpt_gen.*`` / ``image_gen_projector*``), through ``RELEASED_*`` tables below.
* ``init_from_parts``: the from-scratch start of VARGPT §4.5: Qwen2-VL (LLM, ViT, lm_head) from a model folder,
  Infinity-2B into the decoder, the BSQ-VAE into the tokenizer, a fresh bridge.

Loading never holds the weights twice: the model is built with its parameters on the meta device (buffers such as
the rotary frequencies are real, since no checkpoint stores them), every shard's header is checked against the model
first (names and shapes, one report, nothing loaded on a mismatch), then the shards are read one at a time, mapped,
and assigned into the model. Parameters that stay on meta afterwards were allowed to be missing and are initialised
fresh (normal std 0.02, zero biases, unit norm weights, like the reference's ``_init_weights``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.checkpoints.bsq_vae import BSQ_VAE_KEY_MAP, bsq_vae_upstream_state_dict
from vargpt.checkpoints.core import (
    CheckpointError,
    KeyMap,
    LoadReport,
    Rename,
    compare_state_dict,
    load_state_dict_strict,
    load_torch_file,
    safetensors_files,
    write_safetensors_folder,
)
from vargpt.checkpoints.infinity import (
    blocks_per_chunk_from_keys,
    infinity_key_map,
    infinity_upstream_state_dict,
    load_infinity_state_dict,
)
from vargpt.checkpoints.qwen2_vl import QWEN2_VL_KEY_MAP, qwen2_vl_dict_from_config_json, qwen2_vl_name
from vargpt.config import VARGPTConfig
from vargpt.config_io import config_to_dict, dataclass_from_dict
from vargpt.model import VARGPT
from vargpt.text_tokenizer import load_text_tokenizer

EXPORT_FORMAT = "vargpt-lightning"
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
FRESH_INIT_STD = 0.02  # HF `_init_weights` (initializer_range) for the gen projectors and sos_embedding (VARGPT §4.5)

# Released VARGPT-v1.1 bridge names (VARGPT §1.4, §6.2) -> ours. `GenPatchMerger.mlp` = Linear, GELU, Linear.
RELEASED_BRIDGE_NAMES: tuple[tuple[str, str], ...] = (
    ("image_gen_projector.mlp.0.weight", "bridge.in_projector.fc1.weight"),
    ("image_gen_projector.mlp.0.bias", "bridge.in_projector.fc1.bias"),
    ("image_gen_projector.mlp.2.weight", "bridge.in_projector.fc2.weight"),
    ("image_gen_projector.mlp.2.bias", "bridge.in_projector.fc2.bias"),
    ("image_gen_projector_out.mlp.0.weight", "bridge.out_projector.fc1.weight"),
    ("image_gen_projector_out.mlp.0.bias", "bridge.out_projector.fc1.bias"),
    ("image_gen_projector_out.mlp.2.weight", "bridge.out_projector.fc2.weight"),
    ("image_gen_projector_out.mlp.2.bias", "bridge.out_projector.fc2.bias"),
)
RELEASED_START_TABLE = "sos_embedding.weight"  # (start id + 1, condition_dim); only row <|image_gen_start|> is used
RELEASED_DROPPED = (r"image_gen_projector(?:_out)?\.ln_q\.(?:weight|bias)",)  # LayerNorms built but never applied
RELEASED_PREFIXES = ("vargpt_gen.", "image_gen_projector")  # weight names only the released VARGPT folder has
INFINITY_PREFIX, VAE_PREFIX = "vargpt_gen.", "vae_local."
RELEASED_BLOCK_CHUNKS = 8  # Infinity-2B saved with block_chunks=8 (VARGPT §1.5)


# ---------------------------------------------------------------------------------------------- key maps


def _prefixed(key_map: KeyMap, source_prefix: str, target_prefix: str) -> tuple[list[Rename], list[str]]:
    """The rules and drops of ``key_map`` moved under ``source_prefix`` (upstream) and ``target_prefix`` (ours)."""
    source = re.escape(source_prefix)
    rules = []
    for rule in key_map.rules:
        inner = rule.replacement
        if callable(inner):

            def replacement(match: re.Match[str], inner: Callable[[re.Match[str]], str] = inner) -> str:
                return target_prefix + inner(match)

            rules.append(Rename(source + rule.pattern, replacement, rule.transform))
        else:
            rules.append(Rename(source + rule.pattern, target_prefix + inner, rule.transform))
    return rules, [source + pattern for pattern in key_map.drop]


def _start_row(start_token_id: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Transform: the released ``sos_embedding`` table -> its one used row (our ``bridge.start_condition``)."""

    def take(table: torch.Tensor) -> torch.Tensor:
        if table.dim() != 2 or table.shape[0] <= start_token_id:
            raise CheckpointError(
                f"{RELEASED_START_TABLE} has shape {tuple(table.shape)}; it needs row {start_token_id} "
                "(image_gen_start_token_id)"
            )
        return table[start_token_id].clone()

    return take


def released_key_map(config: VARGPTConfig, blocks_per_chunk: int = 4) -> KeyMap:
    """The rename table released VARGPT-v1.1 -> ours (Qwen2-VL 4.x names, bridge, start row, Infinity, BSQ-VAE)."""
    rules = list(QWEN2_VL_KEY_MAP.rules)
    rules += [Rename(re.escape(up), ours) for up, ours in RELEASED_BRIDGE_NAMES]
    rules.append(
        Rename(re.escape(RELEASED_START_TABLE), "bridge.start_condition", _start_row(config.image_gen_start_token_id))
    )
    drops = list(RELEASED_DROPPED)
    for part, source, target in (
        (infinity_key_map(blocks_per_chunk), INFINITY_PREFIX, "decoder."),
        (BSQ_VAE_KEY_MAP, VAE_PREFIX, "tokenizer."),
    ):
        part_rules, part_drops = _prefixed(part, source, target)
        rules += part_rules
        drops += part_drops
    return KeyMap(rules=tuple(rules), drop=tuple(drops), name="VARGPT-v1.1")


EXPORT_KEY_MAP = KeyMap(rules=(Rename(r"(.+)", r"\1"),), name=EXPORT_FORMAT)


def released_state_dict(model: VARGPT, block_chunks: int = RELEASED_BLOCK_CHUNKS, seed: int = 0) -> dict[str, Any]:
    """``model``'s weights in the released VARGPT-v1.1 layout (the inverse of ``released_key_map``).

    Includes what the released files carry beyond our weights: the unused ``ln_q`` LayerNorms (identity init), the
    full ``sos_embedding`` table (other rows random, the start row = ``bridge.start_condition``), Infinity's zero
    k-bias buffers in ``block_chunks`` naming, and the VAE's ``quantizer.lfq.mask``. Works on the meta device.
    """
    config = model.config
    state: dict[str, torch.Tensor] = {}
    ours = model.state_dict()
    for name, tensor in ours.items():
        if name.startswith(("backbone.", "lm_head.")):
            state[qwen2_vl_name(name)] = tensor
    bridge_names = {mine: up for up, mine in RELEASED_BRIDGE_NAMES}
    for mine, up in bridge_names.items():
        state[up] = ours[mine]
    device = ours["bridge.in_projector.fc1.weight"].device
    widths = {"image_gen_projector": config.decoder.width, "image_gen_projector_out": config.llm_hidden_size}
    for projector, width in widths.items():
        state[f"{projector}.ln_q.weight"] = torch.ones(width, device=device)
        state[f"{projector}.ln_q.bias"] = torch.zeros(width, device=device)
    start = ours["bridge.start_condition"]
    rows = config.image_gen_start_token_id + 1
    if start.device.type == "meta":
        table = torch.empty(rows, start.shape[0], device="meta", dtype=start.dtype)
    else:
        generator = torch.Generator().manual_seed(seed)
        table = (torch.randn(rows, start.shape[0], generator=generator) * FRESH_INIT_STD).to(start.dtype)
        table[config.image_gen_start_token_id] = start.detach().cpu()
    state[RELEASED_START_TABLE] = table
    for name, tensor in infinity_upstream_state_dict(model.decoder, block_chunks).items():
        state[INFINITY_PREFIX + name] = tensor
    for name, tensor in bsq_vae_upstream_state_dict(model.tokenizer).items():
        if not name.startswith("quantize."):  # VARGPT replaces `vae_local.quantize` by Identity (VARGPT §4.5)
            state[VAE_PREFIX + name] = tensor
    return state


def released_config_json(config: VARGPTConfig) -> dict[str, Any]:
    """A ``config.json`` in the released model's format (transformers 4.46 flat Qwen2-VL fields, VARGPT §6.1)."""
    text = config.qwen2_vl["text_config"]
    rope = text.get("rope_parameters", {})
    out: dict[str, Any] = {"model_type": "vargpt_qwen2_vl", "architectures": ["VARGPTQwen2VLForConditionalGeneration"]}
    out.update({key: value for key, value in text.items() if key != "rope_parameters"})
    out["rope_theta"] = rope.get("rope_theta", 1000000.0)
    out["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope.get("mrope_section", [16, 24, 24]))}
    vision = dict(config.qwen2_vl.get("vision_config", {}))
    if "in_channels" in vision:
        vision["in_chans"] = vision.pop("in_channels")
    out["vision_config"] = vision
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if key in config.qwen2_vl:
            out[key] = config.qwen2_vl[key]
    out["tie_word_embeddings"] = bool(config.qwen2_vl.get("tie_word_embeddings", False))
    out["pad_token_id"] = config.pad_token_id
    out["special_tokens"] = {
        "image_gen_start": "<|image_gen_start|>",
        "image_gen_start_token_id": config.image_gen_start_token_id,
        "image_gen_end": "<|image_gen_end|>",
        "image_gen_end_token_id": config.image_gen_end_token_id,
        "image_gen_pad": "<|image_gen_pad|>",
        "image_gen_pad_token_id": config.image_gen_pad_token_id,
    }
    return out


def config_from_released(data: Mapping[str, Any], **overrides: Any) -> VARGPTConfig:
    """Our ``VARGPTConfig`` from the released ``config.json``: its Qwen2-VL fields and token ids, with the
    Infinity-2B / d32 BSQ-VAE / 0.25M defaults for everything the reference hard-codes (VARGPT §6.1)."""
    special = data.get("special_tokens") or {}
    reference = VARGPTConfig.__dataclass_fields__
    fields: dict[str, Any] = {"qwen2_vl": qwen2_vl_dict_from_config_json(dict(data))}
    for name in ("image_gen_start", "image_gen_end", "image_gen_pad"):
        fields[f"{name}_token_id"] = int(special.get(f"{name}_token_id", reference[f"{name}_token_id"].default))
    if isinstance(data.get("pad_token_id"), int):
        fields["pad_token_id"] = data["pad_token_id"]
    if isinstance(data.get("eos_token_id"), int):
        fields["im_end_token_id"] = data["eos_token_id"]  # Qwen2-VL-Instruct's eos is <|im_end|>
    fields.update(overrides)
    return VARGPTConfig(**fields)


# ---------------------------------------------------------------------------------------------- building


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this block, every parameter a module registers is moved to the meta device (buffers stay real).

    A module's ``__init__`` may still allocate each parameter briefly before it moves, but initialisation runs on
    meta (free) and nothing accumulates. Buffers stay real because checkpoints do not hold the non-persistent ones
    (rotary frequencies) and they must exist after loading.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_empty(config: VARGPTConfig) -> VARGPT:
    """A ``VARGPT`` whose parameters are on the meta device (to be filled by loading), its buffers real."""
    with parameters_on_meta():
        return VARGPT(config)


def _meta_parameters(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.device.type == "meta"]


# Parameters of our optional modules that start at zero by design, so that a module added to trained weights (with
# allow_missing) changes nothing until it trains: the sequential conditioners' output layers, the source path.
ZERO_START = (
    r"decoder\.(sequential|token_sequential)\.out\.(weight|bias)",
    r"decoder\.source_embed\.weight",
    r"decoder\.source_gain",
)


def initialise_fresh(
    model: nn.Module, names: Iterable[str], device: torch.device | str, dtype: torch.dtype | None, seed: int = 0
) -> None:
    """Materialise the meta parameters ``names`` as HF ``_init_weights``: normal(0, 0.02), biases 0, norm weights 1;
    those matching ``ZERO_START`` (our optional modules' outputs) at zero."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        owner_name, _, attribute = name.rpartition(".")
        owner = modules[owner_name]
        old = owner._parameters[attribute]
        value = torch.empty(old.shape, dtype=torch.float32)
        if any(re.fullmatch(pattern, name) for pattern in ZERO_START):
            value.zero_()
        elif "norm" in type(owner).__name__.lower():
            value.fill_(1.0 if attribute == "weight" else 0.0)
        elif attribute == "bias":
            value.zero_()
        else:
            value.normal_(0.0, FRESH_INIT_STD, generator=generator)
        target_dtype = dtype or (old.dtype if old.dtype.is_floating_point else torch.float32)
        owner._parameters[attribute] = nn.Parameter(value.to(device, target_dtype), requires_grad=old.requires_grad)


def _finish(
    model: VARGPT, device: torch.device | str, dtype: torch.dtype | None, fresh: Iterable[str] = (), seed: int = 0
) -> VARGPT:
    """Initialise the allowed-missing parameters, check nothing is left on meta, move buffers to ``device``."""
    on_meta = set(_meta_parameters(model))
    initialise_fresh(model, [name for name in fresh if name in on_meta], device, dtype, seed)
    left = _meta_parameters(model)
    if left:
        raise CheckpointError(f"{len(left)} parameters were never loaded: {left[:10]}")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- streaming load


def _header_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name -> (shard file, shape) from the safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in found:
                    raise CheckpointError(f"tensor {key!r} is in both {found[key][0]} and {path}")
                found[key] = (path, tuple(handle.get_slice(key).get_shape()))
    return found


def load_folder_streaming(
    model: nn.Module,
    folder: str | os.PathLike[str],
    key_map: KeyMap,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    describe_missing: Callable[[str], str] | None = None,
) -> LoadReport:
    """Load a safetensors folder into ``model`` through ``key_map``, one shard at a time, strictly.

    All headers are checked first: a missing (not matching an ``allow_missing`` regex over our names), unexpected
    (``allow_unexpected``, over our names or, for keys no rule maps, upstream names) or mis-shaped tensor raises
    ``CheckpointError`` listing every problem before any weight is read. Tensors are assigned into the module
    (``load_state_dict(assign=True)``), cast to ``dtype`` when given (floating tensors only) and moved to ``device``.
    """
    from safetensors import safe_open

    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    headers = _header_shapes(safetensors_files(folder))
    mapping, dropped, unmatched = key_map.map_names(headers)
    rules = {source: key_map.target(source)[1] for source in mapping}  # type: ignore[index]
    provided: dict[str, tuple[int, ...]] = {}
    for source, ours in mapping.items():
        shape = headers[source][1]
        transform = rules[source].transform
        if transform is not None:
            shape = tuple(transform(torch.empty(shape, device="meta")).shape)
        provided[ours] = shape
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    report = compare_state_dict(expected, provided, str(folder), allow_missing, allow_unexpected)
    sources = {ours: source for source, ours in mapping.items()}
    report.unexpected = [f"{name} (from {sources[name]!r})" for name in report.unexpected]
    report.unexpected += [
        f"{name} (no rule in the {key_map.name} key map)"
        for name in unmatched
        if not any(re.fullmatch(pattern, name) for pattern in allow_unexpected)
    ]
    report.mismatched = [(f"{name} (from {sources[name]!r})", got, want) for name, got, want in report.mismatched]
    if describe_missing is not None:
        report.missing = [describe_missing(name) for name in report.missing]
    report.dropped = dropped
    if not report.ok:
        raise CheckpointError(report.describe())
    by_file: dict[Path, list[str]] = {}
    for source, ours in mapping.items():
        if ours in expected:
            by_file.setdefault(headers[source][0], []).append(source)
    for path, names in by_file.items():
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            for source in names:
                tensor = handle.get_tensor(source)
                transform = rules[source].transform
                if transform is not None:
                    tensor = transform(tensor)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                shard[mapping[source]] = tensor.to(device)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    return report


# ---------------------------------------------------------------------------------------------- export / import


def _tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The text files ``tokenizer.save_pretrained`` writes, as name -> text (written atomically with the weights)."""
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)
        files = {}
        for path in sorted(Path(staging).iterdir()):
            try:
                files[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise CheckpointError(f"tokenizer file {path.name} is not text; cannot export it: {error}") from error
    return files


def save_pretrained(
    model: VARGPT,
    folder: str | os.PathLike[str],
    tokenizer: Any | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export ``model`` atomically: ``config.json`` (the full config), sharded safetensors, tokenizer files.

    ``tokenizer`` defaults to the one attached to the model (``model.text_tokenizer``); without either, no tokenizer
    files are written. An existing export at ``folder`` is replaced only once the new one is complete.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "text_tokenizer", None)
    document = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "vargpt": config_to_dict(model.config)
    }
    extra = _tokenizer_files(tokenizer) if tokenizer is not None else {}
    extra[CONFIG_FILE] = json.dumps(document, indent=2)
    return write_safetensors_folder(
        model.state_dict(),
        folder,
        max_shard_bytes=max_shard_bytes,
        extra_files=extra,
        metadata={"source": EXPORT_FORMAT},
    )


def read_config_json(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict (empty when it has none; a clear error when it is not JSON)."""
    return _read_config_json(Path(folder)) or {}


def _read_config_json(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_layout(folder: str | os.PathLike[str]) -> str:
    """``"export"`` (our ``save_pretrained``) or ``"vargpt_v1_1"`` (the released folder); else a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config = _read_config_json(folder)
    if config is not None and config.get("format") == EXPORT_FORMAT:
        return "export"
    try:
        names = list(_header_shapes(safetensors_files(folder)))
    except CheckpointError as error:
        raise CheckpointError(f"{folder} is not a model folder: {error}") from error
    if any(name.startswith(RELEASED_PREFIXES) for name in names):
        if config is None:
            raise CheckpointError(f"{folder} has released VARGPT-v1.1 weights but no {CONFIG_FILE}")
        return "vargpt_v1_1"
    raise CheckpointError(
        f"{folder} has an unknown layout: neither our export ({CONFIG_FILE} with \"format\": \"{EXPORT_FORMAT}\") "
        f"nor the released VARGPT-v1.1 folder (weights named {list(RELEASED_PREFIXES)}*); "
        f"{CONFIG_FILE} keys: {sorted(config)[:10] if config else None}, first weights: {names[:5]}"
    )


def _load_folder_tokenizer(folder: Path, model: VARGPT) -> Any | None:
    """The folder's text tokenizer attached to ``model`` (ids checked against the config), or None without one."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_text_tokenizer(folder)
    model.attach_tokenizer(tokenizer)
    return tokenizer


def from_pretrained(
    folder: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    config: VARGPTConfig | None = None,
) -> tuple[VARGPT, Any | None]:
    """Load our export or the released VARGPT-v1.1 folder: (model in eval mode, text tokenizer or None).

    The layout is detected (``detect_layout``). Loading is strict and streamed (see ``load_folder_streaming``);
    ``allow_missing`` / ``allow_unexpected`` are regexes over our parameter names, and parameters allowed to be
    missing are initialised fresh. ``dtype=None`` keeps the checkpoint's dtypes. ``config`` replaces the config the
    folder gives: an export's own (``export_config``; a fine-tuning run that changes a training setting such as
    ``bit_loss_weights``, or adds a module whose new parameters ``allow_missing`` names), or the one a released
    folder implies (``config_from_released``: its config.json + the 2B / d32 / 0.25M defaults), for decoder or
    tokenizer sizes other than the reference's. Sizes that do not fit the weights fail the strict load, naming the
    parameters.
    """
    folder = Path(folder)
    layout = detect_layout(folder)
    data = _read_config_json(folder) or {}
    if layout == "export":
        config = config or export_config(folder)
        key_map, describe = EXPORT_KEY_MAP, None
    else:
        config = config or config_from_released(data)
        per_chunk = blocks_per_chunk_from_keys(_header_shapes(safetensors_files(folder)))
        key_map = released_key_map(config, per_chunk)
        describe = _released_name_note(config, per_chunk)
    model = build_empty(config)
    load_folder_streaming(model, folder, key_map, device, dtype, allow_missing, allow_unexpected, describe)
    allowed = [name for name in _meta_parameters(model) if any(re.fullmatch(p, name) for p in allow_missing)]
    _finish(model, device, dtype, fresh=allowed)
    return model, _load_folder_tokenizer(folder, model)


def export_config(folder: str | os.PathLike[str]) -> VARGPTConfig:
    """The ``VARGPTConfig`` an export folder was saved with (its ``config.json``'s ``"vargpt"`` section)."""
    folder = Path(folder)
    data = _read_config_json(folder) or {}
    if "vargpt" not in data:
        raise CheckpointError(f"{folder / CONFIG_FILE} has no 'vargpt' section (the model config)")
    return dataclass_from_dict(VARGPTConfig, data["vargpt"], where="vargpt")


def _released_name_note(config: VARGPTConfig, blocks_per_chunk: int) -> Callable[[str], str]:
    """Describe a missing parameter of ours by the released key it comes from."""
    from vargpt.checkpoints.infinity import upstream_name

    bridge = {ours: up for up, ours in RELEASED_BRIDGE_NAMES}

    def describe(name: str) -> str:
        if name.startswith(("backbone.", "lm_head.")):
            up = qwen2_vl_name(name)
        elif name in bridge:
            up = bridge[name]
        elif name == "bridge.start_condition":
            up = f"{RELEASED_START_TABLE}[{config.image_gen_start_token_id}]"
        elif name.startswith("decoder."):
            up = INFINITY_PREFIX + upstream_name(name.removeprefix("decoder."), blocks_per_chunk)
        else:
            up = VAE_PREFIX + name.removeprefix("tokenizer.")
        return f"{name} (released {up!r})"

    return describe


def _require_path(path: str | os.PathLike[str], kind: str, directory: bool) -> Path:
    path = Path(path)
    if not (path.is_dir() if directory else path.is_file()):
        raise FileNotFoundError(f"{kind} not found: {path}")
    return path


def init_from_parts(
    qwen2_vl_folder: str | os.PathLike[str],
    infinity_pth: str | os.PathLike[str],
    bsq_vae_pth: str | os.PathLike[str],
    config: VARGPTConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    infinity_entry: str | None = None,
    bsq_vae_entry: str | None = "vae",
    seed: int = 0,
) -> VARGPT:
    """The from-scratch model of VARGPT §4.5, every part loaded strictly, with the Qwen2-VL tokenizer attached.

    Qwen2-VL's LLM, ViT and lm_head come from ``qwen2_vl_folder`` (safetensors, transformers 4.x or 5.x names),
    Infinity from ``infinity_pth``, the BSQ-VAE from ``bsq_vae_pth`` (both ``weights_only=True``); the bridge and
    the start condition are fresh (normal std 0.02, zero biases; seeded by ``seed``), as the reference's. The text
    tokenizer is the folder's plus VARGPT's three generation tokens; its ids must match ``config``'s.
    """
    folder = _require_path(qwen2_vl_folder, "Qwen2-VL folder", directory=True)
    infinity_path = _require_path(infinity_pth, "Infinity checkpoint", directory=False)
    vae_path = _require_path(bsq_vae_pth, "BSQ-VAE checkpoint", directory=False)
    config = config or VARGPTConfig()
    model = build_empty(config)
    load_folder_streaming(
        model, folder, QWEN2_VL_KEY_MAP, device, dtype, allow_missing=(r"bridge\..+", r"decoder\..+", r"tokenizer\..+")
    )
    infinity_state = load_torch_file(infinity_path, infinity_entry)
    load_infinity_state_dict(model.decoder, infinity_state, str(infinity_path), assign=True)
    vae_state, _, _ = BSQ_VAE_KEY_MAP.apply(load_torch_file(vae_path, bsq_vae_entry))
    load_state_dict_strict(model.tokenizer, vae_state, source=str(vae_path), assign=True)
    for module in (model.decoder, model.tokenizer):
        for param in module.parameters():
            target = dtype if dtype is not None and param.is_floating_point() else param.dtype
            param.data = param.data.to(device, target)
    model.tokenizer.requires_grad_(False)
    fresh = [name for name, _ in model.bridge.named_parameters(prefix="bridge")]
    _finish(model, device, dtype, fresh=fresh, seed=seed)
    model.attach_tokenizer(load_text_tokenizer(folder))
    return model
