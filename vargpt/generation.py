"""Inference of the unified model without patching transformers: chat, text-to-image, editing, mixed replies.

``reply`` is ONE decode loop: it writes text token by token with the LLM's ``DynamicCache``; when the model emits
``<|image_gen_start|>`` the loop feeds it and hands over to next-scale sampling (``sample_image``), which keeps using
the same cache, one LLM call per scale; then it feeds the P - L padding placeholders (``in_projector(0)``, as in
training) and ``<|image_gen_end|>`` and goes on writing text until ``<|im_end|>``.

Classifier-free guidance. The unconditional branch is a real, cached LLM pass over an EMPTY prompt (system + empty
user turn + assistant header + ``<|image_gen_start|>``) with the same start condition; its hidden states are its
cross-attention context, exactly as a dropped span in training. ``generate_images`` runs the conditional and the
unconditional rows as one left-padded LLM batch and one decoder batch. With ``reference_compat`` the reference's
branch is used instead (VARGPT §2.4): start condition from ``cfg_uncond[0]``, context = the raw rows
``cfg_uncond[:T_prompt]``, and the LLM runs each scale alone without any cache, positions from 0.

Positions follow ``vargpt.positions``: M-RoPE from ``get_rope_index`` for the prompt, then every fed block continues
1-D. Each sample row draws its bits from its own generator (``seed``), so a batch equals single runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache, Qwen2VLImageProcessor

from vargpt.chat import (
    IMAGE_GEN_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    ChatTokenIds,
    encode_generation_prompt,
    image_placeholder_count,
)
from vargpt.config import SamplingConfig
from vargpt.decoder import DecoderCondition, concat_conditions
from vargpt.positions import continue_positions, mrope_position_ids
from vargpt.sampling import sample_scale
from vargpt.schedules import placeholder_count, scale_schedule, token_count, validate_schedule
from vargpt.tokenizer import accumulate_codes, next_scale_input, residual_bits

SUPPORTED_IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P")
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses longer / shorter side above 200 (VARGPT §1.3)
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Reply:
    """One assistant turn: ``text`` with ``<image_gen>`` where each image was generated, and the images."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class LLMState:
    """The LLM side of a running generation: KV cache, 2-D attention mask, next position and hidden states."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # (B, T) long, 0 on left padding
    next_position: torch.Tensor  # (B,)
    hidden: torch.Tensor  # (B, T, H) final hidden states of every fed token (cross-attention contexts)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


# ---------------------------------------------------------------------------------------------------- checks


def _check_sampling(
    cfg: float | None,
    temperature: float | None,
    top_p: float | None,
    defaults: SamplingConfig | None = None,
    cfg_schedule: str | None = None,
) -> SamplingConfig:
    """A validated ``SamplingConfig``; ``None`` takes the value of ``defaults`` (the model config's sampling)."""
    if defaults is not None:
        cfg = defaults.cfg if cfg is None else cfg
        temperature = defaults.temperature if temperature is None else temperature
        top_p = defaults.top_p if top_p is None else top_p
        cfg_schedule = defaults.cfg_schedule if cfg_schedule is None else cfg_schedule
    for name, value in (("cfg", cfg), ("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    schedule = cfg_schedule or SamplingConfig.cfg_schedule
    return SamplingConfig(cfg=float(cfg), temperature=float(temperature), top_p=float(top_p), cfg_schedule=schedule)


def _check_image(image: Any, index: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image {index} must be a PIL.Image, got {type(image).__name__}")
    if image.mode not in SUPPORTED_IMAGE_MODES:
        raise ValueError(f"image {index} has unsupported mode {image.mode!r}; supported: {SUPPORTED_IMAGE_MODES}")
    width, height = image.size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image {index} has unsupported size {width}x{height}: both sides must be >= 1 and the aspect ratio "
            f"<= {MAX_ASPECT_RATIO}"
        )
    return image.convert("RGB")


def _resolve_schedule(model: Any, pn: str | None, aspect: float, schedule: Sequence[Sequence[int]] | None) -> list:
    if schedule is not None:
        resolved = validate_schedule([tuple(scale) for scale in schedule])
    elif pn is not None:
        resolved = scale_schedule(pn, aspect)
    else:
        resolved = model.config.schedule
    if resolved[0] != (1, 1):
        raise ValueError(f"the first scale must be (1, 1), the single start token; got {resolved[0]}")
    if len(resolved) > model.config.decoder.num_levels:
        raise ValueError(f"the schedule has {len(resolved)} scales; the decoder has {model.config.decoder.num_levels}")
    return resolved


def _token_ids(model: Any) -> ChatTokenIds:
    if model.text_tokenizer is None:
        raise ValueError("the model has no text tokenizer: call model.attach_tokenizer(tokenizer) first")
    return ChatTokenIds.from_tokenizer(model.text_tokenizer)


# ---------------------------------------------------------------------------------------------------- LLM steps


def preprocess_images(model: Any, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patches and (t, h, w) grids of understanding images (min/max pixels from the config)."""
    checked = [_check_image(image, index) for index, image in enumerate(images)]
    processor = Qwen2VLImageProcessor(
        min_pixels=model.config.understanding_min_pixels, max_pixels=model.config.understanding_max_pixels
    )
    out = processor(images=checked, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


def prefill(
    model: Any,
    rows: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> LLMState:
    """Run the prompts ``rows`` (left-padded into one batch) through the LLM and keep the cache."""
    device = model.lm_head.weight.device
    longest = max(len(row) for row in rows)
    if longest > model.config.max_positions:
        raise ValueError(
            f"a prompt has {longest} tokens, more than the context of {model.config.max_positions} "
            "(max_position_embeddings)"
        )
    input_ids = torch.full((len(rows), longest), model.config.pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(list(row), dtype=torch.long, device=device)
        attention_mask[index, longest - len(row) :] = 1
    if pixel_values is not None:
        pixel_values, image_grid_thw = pixel_values.to(device), image_grid_thw.to(device)
    embeds = model.embed(input_ids, pixel_values, image_grid_thw)
    positions, next_position = mrope_position_ids(
        model.backbone, input_ids, attention_mask, image_grid_thw, model.config.image_token_id
    )
    out = model.backbone.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True
    )
    return LLMState(out["cache"] if "cache" in out else out.past_key_values, attention_mask, next_position,
                    out.last_hidden_state)


def cache_keyword(language_model: Any) -> str:
    """The LLM forward's name for the KV cache: ``cache`` from transformers 5.24 on (``past_key_values`` is deprecated
    there, to go in 5.40), ``past_key_values`` before."""
    return _cache_keyword_of(type(language_model))


@functools.cache
def _cache_keyword_of(language_model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(language_model_class.forward).parameters else "past_key_values"


def feed(model: Any, state: LLMState, embeds: torch.Tensor) -> torch.Tensor:
    """Append (B, n, H) input embeddings to every row of ``state``; return their final hidden states."""
    length = embeds.shape[1]
    if int(state.next_position.max()) + length > model.config.max_positions:
        raise ValueError(
            f"the sequence would reach position {int(state.next_position.max()) + length}, beyond the context of "
            f"{model.config.max_positions} (max_position_embeddings)"
        )
    state.attention_mask = torch.cat((state.attention_mask, state.attention_mask.new_ones(state.batch_size, length)), 1)
    out = model.backbone.language_model(
        inputs_embeds=embeds,
        attention_mask=state.attention_mask,
        position_ids=continue_positions(state.next_position, length),
        use_cache=True,
        **{cache_keyword(model.backbone.language_model): state.cache},
    )
    state.next_position = state.next_position + length
    state.hidden = torch.cat((state.hidden, out.last_hidden_state), dim=1)
    return out.last_hidden_state


def feed_tokens(model: Any, state: LLMState, token_ids: torch.Tensor) -> torch.Tensor:
    """Append (B, n) token ids; return their final hidden states."""
    return feed(model, state, model.backbone.get_input_embeddings()(token_ids))


def _context_before_last(model: Any, state: LLMState) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected hidden states of every token before the last fed one (``<|image_gen_start|>``) and their mask."""
    hidden = state.hidden[:, :-1]
    mask = state.attention_mask[:, : hidden.shape[1]].bool()
    return model.bridge.out_projector(hidden) * mask.unsqueeze(-1).to(hidden.dtype), mask


# ---------------------------------------------------------------------------------------------------- images


@dataclass
class ImageSample:
    """Bits per scale (B, h_k, w_k, d), the conditional logits per scale (B, n_k, 2d) and the final codes."""

    bits: list[torch.Tensor]
    cond_logits: list[torch.Tensor]
    f_hat: torch.Tensor


def _uncond_llm_reference(model: Any, embeds: torch.Tensor) -> torch.Tensor:
    """The reference's unconditional LLM call: this scale's tokens alone, no cache, positions from 0."""
    return model.backbone.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


def sample_image(
    model: Any,
    states: Sequence[LLMState],
    batch_size: int,
    schedule: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    forced_bits: Sequence[torch.Tensor] | None = None,
    source_features: torch.Tensor | None = None,
) -> ImageSample:
    """Next-scale sampling of B images after ``<|image_gen_start|>`` was fed to every row of ``states``.

    ``states`` lists the LLM states in decoder-batch order: the B conditional rows, then, when guiding, the B
    unconditional rows of the cached empty-prompt branch (not with ``reference_compat``, whose unconditional rows
    run uncached). ``forced_bits``: bits (B, h_k, w_k, d) of the first k <= len(schedule) scales, taken instead of
    sampled ones (scoring given bits, or completing images from given coarse scales); logits are unchanged by it,
    except a sequential or within-token scale's (``decoder.sequential_scales``, ``decoder.token_sequential_scales``),
    whose bits see the bits taken before them.
    ``source_features``: with ``decoder.source_condition``, the image tokenizer's features (B, d, H, W) of the images
    being edited (``encode_sources``); each scale's copy bits are computed from them and the bits taken so far, as in
    training (``tokenizer.copy_bits``). Both CFG branches see them, so guidance acts on the instruction.
    """
    _check_forced_bits(forced_bits, schedule, batch_size)
    if source_features is not None:
        expected = (batch_size, model.config.decoder.bits, *schedule[-1])
        if tuple(source_features.shape) != expected:
            raise ValueError(
                f"source_features must be {expected} (B, d, final grid), got {tuple(source_features.shape)}"
            )
    config = model.config
    compat = config.reference_compat
    guided = sampling.cfg != 1.0
    aspect = schedule[-1][0] / schedule[-1][1]
    condition = _conditions(model, states, batch_size, guided)
    copies = condition.batch_size // batch_size
    cache = model.decoder.new_cache(condition.batch_size)
    x = model.decoder.embed_inputs(condition.cond, None)
    adaln = model.adaln_condition(condition.cond, condition.context, condition.context_mask)
    f_hat, all_bits, all_logits = None, [], []
    for k, (h, w) in enumerate(schedule):
        llm_in = model.generation_inputs(x, [(h, w)])
        outputs, offset = [], 0
        for state in states:
            outputs.append(feed(model, state, llm_in[offset : offset + state.batch_size]))
            offset += state.batch_size
        if compat and guided:
            outputs.append(_uncond_llm_reference(model, llm_in[offset:]))
        hidden = model.bridge.out_projector(torch.cat(outputs))
        source = None
        if source_features is not None:
            source = residual_bits(source_features, f_hat, (h, w)).flatten(1, 2).repeat(copies, 1, 1)
            hidden = hidden + model.decoder.embed_source(source).to(hidden.dtype)
        logits = model.decoder.step(
            hidden, k, adaln, condition.context, condition.context_mask, schedule, cache, aspect
        )
        if source is not None:
            logits = model.decoder.add_source_logits(logits, source)
        forced = None
        if forced_bits is not None and k < len(forced_bits):
            forced = forced_bits[k].to(logits.device).flatten(1, 2)
        bits, cond_logits = sample_scale(
            model.decoder, logits, k, batch_size, sampling, generators, forced, scales=len(schedule)
        )
        bits = bits.unflatten(1, (h, w))
        all_logits.append(cond_logits)
        all_bits.append(bits)
        f_hat = accumulate_codes(f_hat, bits, schedule[-1])
        if k + 1 < len(schedule):
            x = model.decoder.word_embed(next_scale_input(f_hat, schedule[k + 1])).repeat(copies, 1, 1)
    return ImageSample(bits=all_bits, cond_logits=all_logits, f_hat=f_hat)


def _check_forced_bits(
    forced_bits: Sequence[torch.Tensor] | None, schedule: Sequence[Sequence[int]], batch_size: int
) -> None:
    if forced_bits is None:
        return
    if len(forced_bits) > len(schedule):
        raise ValueError(f"forced_bits has {len(forced_bits)} scales but the schedule only {len(schedule)}")
    for k, (bits, (h, w)) in enumerate(zip(forced_bits, schedule)):
        if bits.ndim != 4 or tuple(bits.shape[:3]) != (batch_size, h, w):
            raise ValueError(
                f"forced_bits[{k}] must be ({batch_size}, {h}, {w}, d) for scale {k} of the schedule, got "
                f"{tuple(bits.shape)}"
            )


def encode_sources(model: Any, images: Sequence[Any], schedule: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """The image tokenizer's features (B, d, H, W) of the images being edited, for ``decoder.source_condition``
    (None when the model has no source embedding): each image resized to cover the schedule's final size in pixels,
    centre cropped and encoded, as editing SFT's evaluation transform does with its inputs."""
    if not model.config.decoder.source_condition:
        return None
    height, width = (side * model.tokenizer.stride for side in schedule[-1])
    pixels = []
    for index, image in enumerate(images):
        image = _check_image(image, index)
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
        pixels.append(array.permute(2, 0, 1).float() / 127.5 - 1.0)
    weight = next(model.tokenizer.parameters())
    return model.tokenizer.encode_features(torch.stack(pixels).to(weight.device, weight.dtype))


def _conditions(
    model: Any, states: Sequence[LLMState], batch_size: int, guided: bool
) -> DecoderCondition:
    """Start conditions and cross-attention contexts of the conditional (and unconditional) decoder rows."""
    contexts = [_context_before_last(model, state) for state in states]
    context = torch.nn.utils.rnn.pad_sequence([c for ctx, _ in contexts for c in ctx], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([m for _, masks in contexts for m in masks], batch_first=True)
    rows = context.shape[0]
    main = DecoderCondition(model.start_condition(rows), context, mask)
    if not (model.config.reference_compat and guided):
        return main
    lengths = mask[:batch_size].sum(1)
    capacity = model.decoder.cfg_uncond.shape[0]
    if int(lengths.max()) > capacity:
        raise ValueError(
            f"reference_compat CFG takes one cfg_uncond row per prompt token, but a prompt has {int(lengths.max())} "
            f"tokens and cfg_uncond has {capacity} rows (text_max_tokens)"
        )
    tokens, uncond_mask = model.decoder.unconditional_tokens(lengths)
    uncond = DecoderCondition(
        model.start_condition(batch_size, unconditional=True),
        tokens * uncond_mask.unsqueeze(-1).to(tokens.dtype),
        uncond_mask,
    )
    return concat_conditions(main, uncond)


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + index for index in range(count)]
    seeds = list(seed)
    if len(seeds) != count or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or one int per prompt ({count}), got {seed!r}")
    return seeds


def _user_turn(prompt: str, with_image: bool) -> dict[str, str]:
    if with_image and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
    return {"role": "user", "content": prompt}


@torch.no_grad()
def generate_images(
    model: Any,
    prompts: Sequence[str],
    cfg: float | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] = 0,
    pn: str | None = None,
    aspect: float = 1.0,
    schedule: Sequence[Sequence[int]] | None = None,
    images: Sequence[Any] | None = None,
    forced_bits: Sequence[torch.Tensor] | None = None,
    cfg_schedule: str | None = None,
) -> list[Image.Image]:
    """One image per prompt. ``cfg`` / ``temperature`` / ``top_p`` / ``cfg_schedule`` default to ``config.sampling``
    (3.0 / 0.5 / 0.97 / constant, VARGPT §2.4). ``images`` (editing): one input image per prompt, placed in the
    user turn at ``<image>`` (prepended when the prompt has none). ``seed``: one per prompt, or an int i giving
    i, i + 1, ... The assistant turn is forced to start with ``<|image_gen_start|>``. Schedule: ``schedule``, else
    ``pn`` at ``aspect``, else the config's. ``forced_bits``: bits (B, h_k, w_k, d) of the first k scales (e.g. the
    image tokenizer's ``encode`` of real images) to take as given; only the later scales are sampled."""
    return _generate(
        model, prompts, cfg, temperature, top_p, seed, pn, aspect, schedule, images, forced_bits, cfg_schedule
    )[0]


def _generate(
    model: Any,
    prompts: Sequence[str],
    cfg: float | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | Sequence[int],
    pn: str | None,
    aspect: float,
    schedule: Sequence[Sequence[int]] | None,
    images: Sequence[Any] | None,
    forced_bits: Sequence[torch.Tensor] | None = None,
    cfg_schedule: str | None = None,
) -> tuple[list[Image.Image], ImageSample]:
    """``generate_images`` returning the raw sample too (bits and conditional logits per scale)."""
    ids = _token_ids(model)
    sampling = _check_sampling(cfg, temperature, top_p, model.config.sampling, cfg_schedule)
    schedule = _resolve_schedule(model, pn, aspect, schedule)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    pixel_values = grids = sources = None
    counts: list[list[int]] = [[] for _ in prompts]
    if images is not None:
        if len(images) != len(prompts):
            raise ValueError(f"editing needs one input image per prompt: {len(prompts)} prompts, {len(images)} images")
        pixel_values, grids = preprocess_images(model, images)
        counts = [[image_placeholder_count(grid.tolist())] for grid in grids]
        sources = encode_sources(model, images, schedule)
    rows = [
        encode_generation_prompt(
            model.text_tokenizer, [_user_turn(prompt, images is not None)], image_token_counts=count, token_ids=ids
        ) + [ids.image_gen_start]
        for prompt, count in zip(prompts, counts)
    ]
    batch = len(rows)
    guided = sampling.cfg != 1.0
    if guided and not model.config.reference_compat:
        rows = rows + [model.unconditional_prompt_ids] * batch
    needed = max(len(row) for row in rows) + token_count(schedule)
    if needed > model.config.max_positions:
        raise ValueError(
            f"prompt + image need {needed} positions, more than the context of {model.config.max_positions} "
            "(max_position_embeddings)"
        )
    model_was_training = model.training
    model.eval()
    try:
        state = prefill(model, rows, pixel_values, grids)
        device = model.lm_head.weight.device
        generators = [torch.Generator(device=device).manual_seed(s) for s in _seeds(seed, batch)]
        sample = sample_image(model, [state], batch, schedule, sampling, generators, forced_bits, sources)
        pictures = _to_pil(model.tokenizer.decode_f_hat(sample.f_hat))
    finally:
        model.train(model_was_training)
    return pictures, sample


# ---------------------------------------------------------------------------------------------------- text


def _choose_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    if not do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def reply(
    model: Any,
    messages: Sequence[dict[str, str]],
    images: Sequence[Any] | None = None,
    max_new_tokens: int = 2048,
    do_sample: bool = False,
    text_temperature: float = 1.0,
    text_top_p: float = 1.0,
    cfg: float | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int = 0,
    pn: str | None = None,
    aspect: float = 1.0,
    schedule: Sequence[Sequence[int]] | None = None,
    allow_images: bool = True,
    logits_processor: LogitsProcessor | None = None,
    cfg_schedule: str | None = None,
) -> Reply:
    """Continue ``messages`` with one assistant turn of text and images (batch 1); see the module docstring.

    ``images`` are the understanding images of the ``<image>`` placeholders, in order; with
    ``decoder.source_condition`` the last one is the source of the images generated (an edit). Text decoding is
    greedy or sampled (``text_temperature``, ``text_top_p``); ``cfg``/``temperature``/``top_p``/``cfg_schedule`` sample
    the image bits.
    ``logits_processor(input_ids (1, T), scores (1, V)) -> scores`` may adjust each text step (as transformers'
    processors do). ``max_new_tokens`` counts text tokens; decoding also stops at the end of the context.
    """
    ids = _token_ids(model)
    sampling = _check_sampling(cfg, temperature, top_p, model.config.sampling, cfg_schedule)
    if do_sample:
        _check_sampling(1.0, text_temperature, text_top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    schedule = _resolve_schedule(model, pn, aspect, schedule)
    pixel_values = grids = sources = None
    counts: list[int] = []
    if images:
        pixel_values, grids = preprocess_images(model, images)
        counts = [image_placeholder_count(grid.tolist()) for grid in grids]
        sources = encode_sources(model, images[-1:], schedule)
    prompt = encode_generation_prompt(model.text_tokenizer, messages, image_token_counts=counts, token_ids=ids)
    device = model.lm_head.weight.device
    model_was_training = model.training
    model.eval()
    try:
        state = prefill(model, [prompt], pixel_values, grids)
        text_generator = torch.Generator(device=device).manual_seed(seed)
        image_generator = torch.Generator(device=device).manual_seed(seed)
        suppressed = [ids.image_gen_end, ids.image_gen_pad, ids.image_pad, ids.pad]
        if not allow_images:
            suppressed.append(ids.image_gen_start)
        history = list(prompt)
        pieces: list[list[int] | None] = [[]]
        pictures: list[Image.Image] = []
        last_hidden = state.hidden[:, -1]
        for _ in range(max_new_tokens):
            if int(state.next_position.max()) >= model.config.max_positions:
                break
            scores = model.lm_head(last_hidden).float()
            if logits_processor is not None:
                scores = logits_processor(torch.tensor([history], device=device), scores)
            scores[:, suppressed] = float("-inf")
            token = _choose_token(scores[0], do_sample, text_temperature, text_top_p, text_generator)
            if token == ids.im_end:
                break
            history.append(token)
            token_tensor = torch.tensor([[token]], device=device)
            last_hidden = feed_tokens(model, state, token_tensor)[:, -1]
            if token != ids.image_gen_start:
                pieces[-1].append(token)
                continue
            sample = _image_after_start(model, state, schedule, sampling, image_generator, sources)
            pictures += _to_pil(model.tokenizer.decode_f_hat(sample.f_hat))
            last_hidden = _close_image(model, state, schedule, ids)[:, -1]
            history += [ids.image_gen_pad] * placeholder_count(schedule, model.config.placeholder_multiple)
            history.append(ids.image_gen_end)
            pieces += [None, []]
    finally:
        model.train(model_was_training)
    text = "".join(
        IMAGE_GEN_PLACEHOLDER if piece is None else model.text_tokenizer.decode(piece, skip_special_tokens=False)
        for piece in pieces
    )
    return Reply(text=text, images=pictures)


def _image_after_start(
    model: Any,
    state: LLMState,
    schedule: list,
    sampling: SamplingConfig,
    generator: torch.Generator,
    source_features: torch.Tensor | None = None,
) -> ImageSample:
    """Sample one image for a single-row state whose last token is ``<|image_gen_start|>``."""
    needed = int(state.next_position.max()) + placeholder_count(schedule, model.config.placeholder_multiple) + 1
    if needed > model.config.max_positions:
        raise ValueError(
            f"the image would end at position {needed}, beyond the context of {model.config.max_positions}"
        )
    states = [state]
    if sampling.cfg != 1.0 and not model.config.reference_compat:
        states.append(prefill(model, [model.unconditional_prompt_ids]))
    return sample_image(model, states, 1, schedule, sampling, [generator], source_features=source_features)


def _close_image(model: Any, state: LLMState, schedule: list, ids: ChatTokenIds) -> torch.Tensor:
    """Feed the padding placeholders (``in_projector(0)``, as in training) and ``<|image_gen_end|>``."""
    extra = placeholder_count(schedule, model.config.placeholder_multiple) - token_count(schedule)
    if extra:
        width = model.config.decoder.width
        zeros = model.lm_head.weight.new_zeros(state.batch_size, extra, width)
        feed(model, state, model.bridge.in_projector(zeros))
    end = torch.full((state.batch_size, 1), ids.image_gen_end, device=model.lm_head.weight.device)
    return feed_tokens(model, state, end)


def chat(
    model: Any,
    messages: Sequence[dict[str, str]],
    images: Sequence[Any] | None = None,
    max_new_tokens: int = 2048,
    do_sample: bool = False,
    **kwargs: Any,
) -> str:
    """Understanding: the assistant's text answer (image generation disabled)."""
    return reply(
        model, messages, images=images, max_new_tokens=max_new_tokens, do_sample=do_sample, allow_images=False,
        **kwargs,
    ).text
