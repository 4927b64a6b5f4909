"""Dataclass configs for the model components.

Every number has the reference's value as its default (VARGPT-v1.1 with Infinity-2B and the d32 BSQ-VAE) and a
comment saying where it comes from. Small configs for tests and the embedded default override these from YAML.
Validation happens in ``__post_init__`` so a bad value fails when the config is built, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def distinct_scale_indices(value: object) -> bool:
    """True when ``value`` is a list (or tuple) of distinct scale indices: ints (not bools) >= 0."""
    return (
        isinstance(value, (list, tuple))
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in value)
        and len(set(value)) == len(value)
    )


@dataclass
class TokenizerConfig:
    """The BSQ-VAE image tokenizer (INFINITY §1). Defaults: `infinity_vae_d32reg.pth`."""

    bits: int = 32  # d: latent channels = bits per token (INFINITY §1.1)
    base_channels: int = 128  # INFINITY §1.1, fixed for every released variant
    encoder_channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    decoder_channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    encoder_res_blocks: int = 2  # INFINITY §1.2
    decoder_res_blocks: int = 3  # INFINITY §1.3 (num_res_blocks + 1)
    group_norm_groups: int = 32  # GroupNorm(32, eps 1e-6)
    group_norm_eps: float = 1e-6
    in_channels: int = 3

    def __post_init__(self) -> None:
        _require(self.bits > 0, f"tokenizer.bits must be positive, got {self.bits}")
        for name in ("encoder_channel_multipliers", "decoder_channel_multipliers"):
            mults = getattr(self, name)
            _require(len(mults) >= 1 and all(m > 0 for m in mults), f"tokenizer.{name} must be positive ints, got {mults}")
            for m in mults:
                _require(
                    (self.base_channels * m) % self.group_norm_groups == 0,
                    f"tokenizer.base_channels * {name} ({self.base_channels}*{m}) must be divisible by "
                    f"group_norm_groups={self.group_norm_groups}",
                )
        _require(
            len(self.encoder_channel_multipliers) == len(self.decoder_channel_multipliers),
            "tokenizer.encoder_channel_multipliers and decoder_channel_multipliers must have the same length "
            "(they set the same stride)",
        )

    @property
    def stride(self) -> int:
        """Pixels per latent cell: one 2x downsample per level except the last (16 for [1,2,4,4,4])."""
        return 2 ** (len(self.encoder_channel_multipliers) - 1)


BIT_LOSS_WEIGHTS = ("uniform", "magnitude", "residual")


@dataclass
class DecoderConfig:
    """The Infinity-style next-scale visual decoder (INFINITY §3). Defaults: `infinity_2b`."""

    depth: int = 32  # INFINITY §3.1
    width: int = 2048  # C
    heads: int = 16  # head_dim 128
    mlp_ratio: float = 4.0  # FFN hidden = round(C*ratio/256)*256 = 8192
    bits: int = 32  # d, must equal the tokenizer's
    condition_dim: int = 2048  # Ct5: width of the text tokens fed to text_norm, the attentive pool and text_mlp
    pool_heads: int | None = None  # attentive pool heads; None = condition_dim // 128 as the reference (INFINITY §9.14)
    text_max_tokens: int = 512  # rows of the learned unconditional text tokens (cfg_uncond)
    num_levels: int = 15  # level (scale) embedding rows
    drop_path: float = 0.1  # linear 0 -> drop_path over depth
    norm_eps: float = 1e-6
    max_attention_scale: float = 100.0  # cosine attention logit scale is clamped at ln(100)
    rope_base: float = 10000.0
    rope_grid_pn: str = "1M"  # RoPE positions are normalised to the final grid of this schedule (INFINITY §3.5)
    # Scales (indices into the schedule) whose bits are sampled one after another, each conditioned on the scale's
    # earlier bits by a small MLP (vargpt/decoder/sequential.py); empty = Infinity's all-at-once sampling.
    sequential_scales: list[int] = field(default_factory=list)
    sequential_max_tokens: int = 4  # the largest sequential scale's h * w
    sequential_hidden: int = 256  # also the width of the within-token conditioner below
    # Scales whose tokens are drawn bit by bit within each token, all tokens at once: each bit conditioned on its own
    # token's earlier bits (so a token's d bits come from their joint, not from d independent draws), the scale still
    # one decoder pass; the fine scales, too big for sequential_scales. Empty = Infinity's all-at-once sampling. (In
    # the shapes world, [2, 3] did not help: generation SFT with residual weights 0.209 vs 0.241 without it, 1224
    # images each; with magnitude weights 0.220 vs 0.194, within the noise.)
    token_sequential_scales: list[int] = field(default_factory=list)
    # Editing: at each scale, the bits that would reproduce the input image on top of the bits taken so far (its
    # "copy bits", ``tokenizer.copy_bits``) are embedded into the decoder's tokens and pull the bit logits towards
    # them by a learned gain (``InfinityDecoder.embed_source`` / ``add_source_logits``, both zero at init), so an
    # edit can copy what it keeps. Off = the reference: the input image reaches the decoder only through the ViT and
    # the LLM's hidden states.
    source_condition: bool = False

    def __post_init__(self) -> None:
        _require(self.depth > 0, f"decoder.depth must be positive, got {self.depth}")
        _require(
            distinct_scale_indices(self.sequential_scales),
            f"decoder.sequential_scales must be distinct scale indices >= 0, got {self.sequential_scales!r}",
        )
        self.sequential_scales = sorted(self.sequential_scales)
        _require(
            distinct_scale_indices(self.token_sequential_scales),
            "decoder.token_sequential_scales must be distinct scale indices >= 0, got "
            f"{self.token_sequential_scales!r}",
        )
        self.token_sequential_scales = sorted(self.token_sequential_scales)
        both = sorted(set(self.sequential_scales) & set(self.token_sequential_scales))
        _require(
            not both,
            f"scale(s) {both} are in both decoder.sequential_scales and decoder.token_sequential_scales: a scale is "
            "drawn either bit by bit over the whole scale or within each token",
        )
        _require(
            isinstance(self.source_condition, bool),
            f"decoder.source_condition must be true or false, got {self.source_condition!r}",
        )
        _require(
            self.sequential_max_tokens > 0 and self.sequential_hidden > 0,
            "decoder.sequential_max_tokens and decoder.sequential_hidden must be positive, got "
            f"{self.sequential_max_tokens} and {self.sequential_hidden}",
        )
        _require(self.width % self.heads == 0, f"decoder.width={self.width} must be divisible by decoder.heads={self.heads}")
        _require(self.head_dim % 4 == 0, f"decoder head_dim={self.head_dim} must be divisible by 4 (2-D RoPE)")
        _require(
            self.pool_heads is None or self.pool_heads > 0,
            f"decoder.pool_heads must be positive or None, got {self.pool_heads}",
        )
        _require(
            self.width % self.resolved_pool_heads == 0,
            f"decoder.width={self.width} must be divisible by pool_heads={self.resolved_pool_heads} (the attentive "
            "pool attends with width / pool_heads channels per head)",
        )
        _require(self.max_attention_scale > 0, f"decoder.max_attention_scale must be > 0, got {self.max_attention_scale}")
        _require(0.0 <= self.drop_path < 1.0, f"decoder.drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def resolved_pool_heads(self) -> int:
        """Heads of the attentive pool: condition_dim // 128 (// 64 when width > 4096), as `TextAttentivePool`."""
        if self.pool_heads is not None:
            return self.pool_heads
        return max(1, self.condition_dim // (64 if self.width > 4096 else 128))

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention memory: Infinity's `mat_kv` takes D = width inputs (`kv_dim=self.D`)."""
        return self.width

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio / 256) * 256) or int(self.width * self.mlp_ratio)


CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SamplingConfig:
    """Bit sampling for next-scale generation (VARGPT §2.4; INFINITY §6)."""

    cfg: float = 3.0  # classifier-free guidance on logits: u + cfg * (c - u)
    temperature: float = 0.5  # tau
    top_p: float = 0.97  # per bit: the minority bit is dropped when its probability <= 1 - top_p
    # "constant": every scale guided by cfg (the reference's); "linear": VAR's ramp, no guidance at the first scale
    # (1.0) rising linearly to cfg at the last, so the coarse layout is drawn from the conditional model itself
    cfg_schedule: str = "constant"

    def __post_init__(self) -> None:
        _require(self.cfg >= 0.0, f"sampling.cfg must be >= 0, got {self.cfg}")
        _require(self.temperature > 0.0, f"sampling.temperature must be > 0, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _require(
            self.cfg_schedule in CFG_SCHEDULES,
            f"sampling.cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}",
        )

    def cfg_at(self, scale_index: int, scales: int | None) -> float:
        """The guidance of scale ``scale_index`` of ``scales``: ``cfg``, or 1 + (cfg - 1) * k / (scales - 1) on the
        linear schedule (``cfg`` when there is one scale)."""
        if self.cfg_schedule == "constant":
            return self.cfg
        if scales is None:
            raise ValueError(f"sampling.cfg_schedule={self.cfg_schedule!r} needs the number of scales")
        if not 0 <= scale_index < scales:
            raise ValueError(f"scale index {scale_index} is outside a schedule of {scales} scales")
        if scales == 1:
            return self.cfg
        return 1.0 + (self.cfg - 1.0) * scale_index / (scales - 1)


def _text_int(text: dict, key: str) -> int | None:
    """``text[key]`` as a positive int (None when absent); anything else is a ConfigError naming the field, not a bare
    ``int()`` error or a float silently truncated."""
    value = text.get(key)
    _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
             f"qwen2_vl.text_config.{key} must be > 0 and an int, got {value!r}")
    return value


def _check_attention_geometry(text: dict) -> None:
    """The LLM's heads and M-RoPE sections fit together (else transformers fails mid-forward with a shape error)."""
    heads, kv_heads = _text_int(text, "num_attention_heads"), _text_int(text, "num_key_value_heads")
    if heads is None:
        return
    head_dim = text.get("head_dim")
    if head_dim is None:  # transformers derives it
        hidden = _text_int(text, "hidden_size")
        _require(hidden is not None, "qwen2_vl.text_config.hidden_size is required when head_dim is not given")
        _require(hidden % heads == 0,
                 f"qwen2_vl.text_config.hidden_size={hidden} must be a multiple of num_attention_heads={heads}")
        head_dim = hidden // heads
    _require(
        kv_heads is None or heads % kv_heads == 0,
        f"qwen2_vl.text_config.num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}",
    )
    section = (text.get("rope_parameters") or {}).get("mrope_section")
    if section is not None:
        _require(
            all(isinstance(n, int) and n > 0 for n in section) and 2 * sum(section) == head_dim,
            f"qwen2_vl.text_config.rope_parameters.mrope_section={section} must be positive ints that sum to half "
            f"the head dim, {head_dim}",
        )


def _default_qwen2_vl() -> dict:
    """Qwen2-VL-7B-Instruct as in the reference's `prepare_vargpt_v1_1.py` (VARGPT §1.2, §1.3)."""
    return {
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    }


@dataclass
class VARGPTConfig:
    """The unified model: Qwen2-VL (understanding + LLM) + generation bridge + Infinity decoder + BSQ-VAE.

    ``qwen2_vl`` is the keyword dict of ``transformers.Qwen2VLConfig`` (``text_config`` / ``vision_config`` / token
    ids). The generation schedule comes from, in order of precedence: ``generation_schedule`` (explicit (h, w)
    scales), ``generation_image_size`` (a square image side; the schedule ends at its latent grid at the tokenizer's
    stride), or ``generation_pn`` + ``generation_aspect`` (Infinity's templates, VARGPT §1.7).
    """

    qwen2_vl: dict = field(default_factory=_default_qwen2_vl)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generation_pn: str = "0.25M"  # 512 px, 10 scales, 2521 tokens (VARGPT §1.7, training_gen_stage=2)
    generation_aspect: float = 1.0  # h / w; the reference only uses 1:1 (VARGPT §1.7)
    generation_schedule: list[list[int]] | None = None
    generation_image_size: int | None = None
    placeholder_multiple: int = 128  # pad_to_multiplier: 2521 tokens -> 2560 placeholders (VARGPT §1.7)
    # VARGPT's generation tokens (VARGPT §2.1) and Qwen2-VL's chat tokens (stock Qwen2-VL tokenizer ids)
    image_gen_start_token_id: int = 151657
    image_gen_end_token_id: int = 151658
    image_gen_pad_token_id: int = 151659
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    pad_token_id: int = 151643  # <|endoftext|>
    image_loss_weight: float = 3.0  # lambda_loss (VARGPT §3.2)
    max_flip: float = 0.3  # bitwise self-correction noise_apply_strength (VARGPT §3.3)
    condition_drop: float = 0.1  # cond_drop_rate: classifier-free guidance dropout per generation span (VARGPT §3.2)
    per_scale_loss_weights: bool = True  # Infinity's reweight_loss_by_scale, really applied (VARGPT §3.2, §8.1.2)
    # Each bit's cross-entropy weighted by how far its residual is from the sign boundary (``magnitude``: |z_i|
    # sqrt(d) of the BSQ-normalised residual z of its token) instead of equally (``uniform``, the reference): a bit
    # near zero barely changes the image whichever sign it takes, one far from it decides it. ``residual``: that
    # times the token's residual norm over the RMS of its image's token norms at that scale, so the tokens the image
    # needs (an object's edge, not the flat background) weigh more.
    bit_loss_weights: str = "uniform"
    reference_compat: bool = False  # reproduce the reference's losses and CFG branch exactly (VARGPT §2.4, §3.2)
    # AdaLN condition from the prompt (Infinity's own design, INFINITY §3.2): the decoder's text_norm + attentive pool
    # over the cross-attention context. False keeps the reference's learned constant, which carries no prompt
    # information (VARGPT §8.1.7); no parameters are added either way, so released weights load with both.
    adaln_from_prompt: bool = False
    # Image tokens that carry their place in their content (0: off, as the reference): each understanding image
    # token (one merged ViT window) gets, added to its LLM input, a fixed 2-D sinusoid of its cell centre's row and
    # column fractions (``vargpt.positions.place_table``), understanding_place_scale times the token's own RMS; each
    # generation token the same with generation_place_scale, from its scale's grid (so a generation cell and the
    # input image's cell at the same place get the same sinusoid). M-RoPE gives place only as rotations, whose
    # height and width frequencies are tiny in a small head: a small LLM reads no place out of them. No parameters
    # are added, so released weights load either way.
    understanding_place_scale: float = 0.0
    generation_place_scale: float = 0.0
    # 0: the place is added across the LLM's whole width. > 0 (divisible by 4, below the width): the place gets the
    # last place_channels channels of each image token's LLM input to itself, at the place scale times the RMS of the
    # other channels, replacing the content there, so that place and content do not overlap.
    place_channels: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    understanding_min_pixels: int = 56 * 56  # Qwen2VLImageProcessor default, for inference images (VARGPT §1.3)
    understanding_max_pixels: int = 512 * 512  # LLaMA-Factory image_resolution in training (VARGPT §1.3)

    def __post_init__(self) -> None:
        _require(
            self.bit_loss_weights in BIT_LOSS_WEIGHTS,
            f"bit_loss_weights must be one of {BIT_LOSS_WEIGHTS}, got {self.bit_loss_weights!r}",
        )
        for name, kind in (("decoder", DecoderConfig), ("tokenizer", TokenizerConfig), ("sampling", SamplingConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
        _require(
            isinstance(self.qwen2_vl, dict),
            f"qwen2_vl must be a dict of Qwen2VLConfig kwargs, got {type(self.qwen2_vl).__name__}",
        )
        text = self.qwen2_vl.get("text_config")
        _require(isinstance(text, dict), "qwen2_vl.text_config must be a dict (hidden_size, vocab_size, ...)")
        for key in ("vocab_size", "hidden_size"):
            _require(key in text, f"qwen2_vl.text_config needs {key!r}")
        _check_attention_geometry(text)
        _require(
            self.decoder.bits == self.tokenizer.bits,
            f"decoder.bits={self.decoder.bits} must equal tokenizer.bits={self.tokenizer.bits}",
        )
        _require(self.placeholder_multiple >= 1, f"placeholder_multiple must be >= 1, got {self.placeholder_multiple}")
        ids = {name: getattr(self, name) for name in (
            "image_gen_start_token_id", "image_gen_end_token_id", "image_gen_pad_token_id", "im_start_token_id",
            "im_end_token_id", "pad_token_id")}
        ids["image_token_id"] = self.image_token_id
        vocab = int(text["vocab_size"])
        for name, value in ids.items():
            _require(
                isinstance(value, int) and 0 <= value < vocab,
                f"{name}={value!r} must be a token id in [0, vocab_size={vocab})",
            )
        _require(len(set(ids.values())) == len(ids), f"special token ids must be distinct, got {ids}")
        _require(
            0 < self.understanding_min_pixels <= self.understanding_max_pixels,
            f"understanding_min_pixels={self.understanding_min_pixels} must be > 0 and <= understanding_max_pixels="
            f"{self.understanding_max_pixels}",
        )
        _require(self.image_loss_weight >= 0, f"image_loss_weight must be >= 0, got {self.image_loss_weight}")
        _require(0.0 <= self.max_flip <= 1.0, f"max_flip must be in [0, 1], got {self.max_flip}")
        _require(0.0 <= self.condition_drop < 1.0, f"condition_drop must be in [0, 1), got {self.condition_drop}")
        _require(
            self.generation_image_size is None or self.generation_image_size % self.tokenizer.stride == 0,
            f"generation_image_size={self.generation_image_size} must be a multiple of the tokenizer stride "
            f"{self.tokenizer.stride}",
        )
        schedule = self.schedule
        _require(schedule[0] == (1, 1), f"the generation schedule must start at (1, 1), got {schedule[0]}")
        _require(
            len(schedule) <= self.decoder.num_levels,
            f"the generation schedule has {len(schedule)} scales but decoder.num_levels={self.decoder.num_levels}",
        )
        _require(
            not self.reference_compat or self.decoder.condition_dim == self.decoder.context_dim,
            "reference_compat feeds raw cfg_uncond rows as cross-attention context (VARGPT §2.4): it needs "
            f"decoder.condition_dim ({self.decoder.condition_dim}) == decoder.width ({self.decoder.width})",
        )
        channels = self.place_channels
        _require(
            isinstance(channels, int) and not isinstance(channels, bool) and channels >= 0 and channels % 4 == 0,
            "place_channels must be an integer >= 0 divisible by 4 (sin and cos of rows and columns), got "
            f"{channels!r}",
        )
        _require(
            channels < self.llm_hidden_size,
            f"place_channels ({channels}) must leave content channels: it must be below "
            f"qwen2_vl.text_config.hidden_size ({self.llm_hidden_size})",
        )
        for name in ("understanding_place_scale", "generation_place_scale"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                f"{name} must be a number >= 0, got {value!r}",
            )
            _require(
                not (value and self.reference_compat),
                f"{name} changes the LLM's image inputs, reference_compat reproduces the reference's: set at most "
                "one of them",
            )
            _require(
                not value or channels or self.llm_hidden_size % 4 == 0,
                f"{name} across the whole width (place_channels=0) needs qwen2_vl.text_config.hidden_size divisible "
                f"by 4, got {self.llm_hidden_size}",
            )
        _require(
            not channels or self.understanding_place_scale or self.generation_place_scale,
            f"place_channels={channels} does nothing without understanding_place_scale or generation_place_scale > 0",
        )
        _require(
            not (self.adaln_from_prompt and self.reference_compat),
            "adaln_from_prompt changes the decoder's conditioning, reference_compat reproduces the reference's: "
            "set at most one of them",
        )
        _require(
            not self.adaln_from_prompt or self.decoder.condition_dim == self.decoder.context_dim,
            "adaln_from_prompt pools the cross-attention context (decoder.width wide) with the condition pool: it "
            f"needs decoder.condition_dim ({self.decoder.condition_dim}) == decoder.width ({self.decoder.width})",
        )

    @property
    def image_token_id(self) -> int:
        """Qwen2-VL's ``<|image_pad|>`` id, read from the Qwen2VLConfig dict."""
        return int(self.qwen2_vl.get("image_token_id", 151655))

    @property
    def llm_hidden_size(self) -> int:
        return int(self.qwen2_vl["text_config"]["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.qwen2_vl["text_config"]["vocab_size"])

    @property
    def max_positions(self) -> int:
        return int(self.qwen2_vl["text_config"].get("max_position_embeddings", 32768))

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """The default generation schedule (see the class docstring for the precedence)."""
        from vargpt.schedules import scale_schedule, schedule_for_latent, validate_schedule

        try:
            if self.generation_schedule is not None:
                return validate_schedule([tuple(scale) for scale in self.generation_schedule])
            if self.generation_image_size is not None:
                side = self.generation_image_size // self.tokenizer.stride
                return schedule_for_latent(side, side)
            return scale_schedule(self.generation_pn, self.generation_aspect)
        except ValueError as error:
            raise ConfigError(f"invalid generation schedule: {error}") from error

    @property
    def placeholder_count(self) -> int:
        """``<|image_gen_pad|>`` tokens per generated image: the schedule's tokens rounded up to the multiple."""
        from vargpt.schedules import placeholder_count

        return placeholder_count(self.schedule, self.placeholder_multiple)
