"""VARGPT: transformers' Qwen2-VL (understanding + LLM) + generation bridge + Infinity decoder + frozen BSQ-VAE.

Wiring (VARGPT §1.8). Understanding images go through ``backbone.visual`` and replace the ``<|image_pad|>``
embeddings. A generation span ``<|image_gen_start|> <|image_gen_pad|> x P`` of a sample carries its target image:

    target -> tokenizer.encode_features (no grad) -> bitwise self-correction -> labels (L, d), inputs (L - 1, d)
    cond = decoder.condition_from_vector(bridge.start_condition);  x = decoder.embed_inputs(cond, inputs)
    LLM inputs at the first L pads = bridge.in_projector(x); at the other P - L pads = bridge.in_projector(0)
    logits = decoder(bridge.out_projector(LLM output at the first L pads), cond, context, schedule)
    context = bridge.out_projector(LLM output of every token of that sample before its <|image_gen_start|>)

With ``decoder.source_condition`` an editing span's input image (``gen_source_images``) also reaches the decoder
directly: at each scale, the bits that would reproduce it on top of the history so far (``tokenizer.copy_bits``) are
embedded into the decoder's tokens and pull the bit logits towards them (``add_source_logits``), so an edit can copy
what it keeps.

With ``adaln_from_prompt`` the decoder's AdaLN condition (not the start token) is instead pooled from ``context``
(Infinity's text pool), so the prompt conditions every block directly; the reference's constant does not (§8.1.7).

The reference zero-padded the decoder tokens to P *before* its input projector, so the P - L padding pads get
``in_projector(0)`` (the projector's biases), not zero embeddings; we do the same, in training and in inference, so
the text after the image sees what it was trained on. Every span is matched to its own row, so batches that mix
understanding, generation, editing and text-only samples line up (the reference did not, VARGPT §8.1.6).

Classifier-free-guidance dropout (``condition_drop`` per span, from the explicit generator): by default a dropped
span is re-run as an extra row whose prompt is EMPTY (system + empty user turn + assistant header), the same
unconditional branch the sampler uses (ARCHITECTURE §3); this needs ``attach_tokenizer``. With
``reference_compat`` the start condition is replaced by ``decoder.cfg_uncond[0]`` and the context is kept
(VARGPT §3.2).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLModel

from vargpt.bridge import GenerationBridge
from vargpt.chat import ChatTokenIds, encode_chat
from vargpt.config import VARGPTConfig
from vargpt.decoder import InfinityDecoder
from vargpt.losses import image_cross_entropy, reference_text_labels, text_cross_entropy
from vargpt.patch_embed import use_linear_patch_embed
from vargpt.positions import add_places, mrope_position_ids, place_table, scale_places
from vargpt.schedules import placeholder_count, token_count, validate_schedule
from vargpt.tokenizer import BSQVAE, bitwise_self_correction, copy_bits, flatten_bits


@dataclass
class TrainingOutput:
    """Losses and the per-span decoder outputs of one training forward.

    ``bit_logits`` (N, L, 2d) / ``bit_labels`` (N, L, d) hold one row per generation span, in the order of
    ``span_rows`` (the batch row of each span, ascending, spans of a row in order of appearance).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_loss_sum: torch.Tensor
    text_token_count: int
    bit_logits: torch.Tensor | None
    bit_labels: torch.Tensor | None
    schedule: list[tuple[int, int]]
    span_rows: torch.Tensor
    condition_dropped: torch.Tensor
    bit_weights: torch.Tensor | None = None  # (N, L, d) per-bit loss weights (``bit_loss_weights``), None = uniform


@dataclass
class GenerationSpans:
    """Where the generation spans of a batch are: batch row and index of the ``<|image_gen_start|>`` token."""

    rows: torch.Tensor  # (N,)
    starts: torch.Tensor  # (N,)


class VARGPT(nn.Module):
    """The unified understanding + next-scale generation model. See the module docstring for the wiring."""

    def __init__(self, config: VARGPTConfig) -> None:
        super().__init__()
        self.config = config
        qwen_config = Qwen2VLConfig(**copy.deepcopy(config.qwen2_vl))
        self.backbone = Qwen2VLModel(qwen_config)
        use_linear_patch_embed(self.backbone.visual)  # the ViT's patch Conv3d as the matrix product it is
        self.lm_head = nn.Linear(config.llm_hidden_size, config.vocab_size, bias=False)
        self.bridge = GenerationBridge(config.decoder.width, config.llm_hidden_size, config.decoder.condition_dim)
        self.decoder = InfinityDecoder(config.decoder)
        self.tokenizer = BSQVAE(config.tokenizer)
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()
        self.text_tokenizer: Any = None
        self.unconditional_prompt_ids: list[int] | None = None

    def train(self, mode: bool = True) -> VARGPT:
        """Switch train/eval mode; the image tokenizer always stays frozen in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    # ------------------------------------------------------------------ text tokenizer

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` for inference and unconditional prompts; its special ids must match the config."""
        ids = ChatTokenIds.from_tokenizer(tokenizer)
        expected = {
            "image_gen_start": self.config.image_gen_start_token_id,
            "image_gen_end": self.config.image_gen_end_token_id,
            "image_gen_pad": self.config.image_gen_pad_token_id,
            "im_start": self.config.im_start_token_id,
            "im_end": self.config.im_end_token_id,
            "image_pad": self.config.image_token_id,
        }
        wrong = {name: (getattr(ids, name), value) for name, value in expected.items() if getattr(ids, name) != value}
        if wrong:
            raise ValueError(
                "the tokenizer's special token ids differ from the model config (tokenizer id, config id): "
                f"{wrong}"
            )
        if len(tokenizer) > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model vocab_size is "
                             f"{self.config.vocab_size}")
        self.text_tokenizer = tokenizer
        self.unconditional_prompt_ids = self.unconditional_prompt(tokenizer, ids)

    @staticmethod
    def unconditional_prompt(tokenizer: Any, ids: ChatTokenIds) -> list[int]:
        """The empty prompt of the unconditional branch: system + empty user turn + assistant header + start."""
        prompt = encode_chat(tokenizer, [{"role": "user", "content": ""}], add_generation_prompt=True, token_ids=ids)
        return prompt.input_ids + [ids.image_gen_start]

    # ------------------------------------------------------------------ building blocks

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the understanding images' ViT features scattered into the ``<|image_pad|>`` slots.

        Images are matched to ``<|image_pad|>`` runs in row-major order (row 0 first), as the collator lists them.
        """
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if pixel_values is None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("the batch has <|image_pad|> tokens but no pixel_values")
            return embeds
        features = self.backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        features = torch.cat(features).to(embeds.dtype)
        scale = self.config.understanding_place_scale
        if scale:
            features = add_places(
                features, self.understanding_places(image_grid_thw), scale, self.config.place_channels
            )
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"the batch has {int(mask.sum())} <|image_pad|> tokens but its images give {features.shape[0]} "
                "features"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    def understanding_places(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(tokens, H) ``place_table`` rows of the understanding images' merged tokens, in the order the vision tower
        returns them: image after image, frame after frame, each merged grid row-major."""
        merge = self.backbone.config.vision_config.spatial_merge_size
        tables = [
            place_table(int(h) // merge, int(w) // merge, self.place_width).repeat(int(t), 1)
            for t, h, w in image_grid_thw.tolist()
        ]
        return torch.cat(tables).to(image_grid_thw.device)

    def generation_inputs(self, tokens: torch.Tensor, scales: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, L, H) LLM inputs of generation tokens (N, L, C): ``in_projector``, plus with ``generation_place_scale``
        each token's place in its scale's grid; ``scales`` lists the (h, w) scales the L tokens cover, in order."""
        projected = self.bridge.in_projector(tokens)
        scale = self.config.generation_place_scale
        if not scale:
            return projected
        table = scale_places(scales, self.place_width)
        if table.shape[0] != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} generation tokens but the scales {list(scales)} have {table.shape[0]}")
        return add_places(projected, table, scale, self.config.place_channels)

    @property
    def place_width(self) -> int:
        """Width of the place tables: ``place_channels``, or the LLM's width when places are added across it."""
        return self.config.place_channels or self.config.llm_hidden_size

    def start_condition(self, count: int, unconditional: bool = False) -> torch.Tensor:
        """(count, D) AdaLN condition: from the learned start vector, or (reference CFG) from ``cfg_uncond[0]``."""
        vector = self.decoder.cfg_uncond[0] if unconditional else self.bridge.start_condition
        return self.decoder.condition_from_vector(vector[None, :].expand(count, -1))

    def adaln_condition(
        self, start: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """(N, D) AdaLN condition of the decoder: ``start`` (the start condition), or with ``adaln_from_prompt`` the
        decoder's ``text_norm`` + attentive pool over the prompt ``context`` (N, T, C) where ``context_mask``."""
        if not self.config.adaln_from_prompt:
            return start
        return self.decoder.pool(self.decoder.text_norm(context), context_mask).to(start.dtype)

    def project_context(
        self, hidden: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context per span: ``out_projector`` of row ``rows[n]``'s tokens before ``ends[n]``.

        Returns (N, T_max, C) zero-padded and a (N, T_max) bool mask (left padding of a row is masked too).
        """
        longest = max(int(ends.max()), 1)
        index = torch.arange(longest, device=hidden.device)
        states = hidden[rows[:, None], index[None, :]]
        mask = (index[None, :] < ends[:, None]) & attention_mask[rows[:, None], index[None, :]].bool()
        context = self.bridge.out_projector(states) * mask.unsqueeze(-1).to(states.dtype)
        return context, mask

    def find_spans(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholders: int
    ) -> GenerationSpans:
        """Locate every ``<|image_gen_start|>`` followed by ``placeholders`` pads (row-major order)."""
        starts = (input_ids == self.config.image_gen_start_token_id) & attention_mask.bool()
        rows, columns = starts.nonzero(as_tuple=True)
        for row, column in zip(rows.tolist(), columns.tolist()):
            span = input_ids[row, column + 1 : column + 1 + placeholders]
            if span.numel() != placeholders or not bool((span == self.config.image_gen_pad_token_id).all()):
                raise ValueError(
                    f"row {row}: <|image_gen_start|> at {column} must be followed by {placeholders} "
                    f"<|image_gen_pad|> tokens (gen_placeholder_count)"
                )
        return GenerationSpans(rows=rows, starts=columns)

    # ------------------------------------------------------------------ training

    def training_forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> TrainingOutput:
        """Teacher-forced losses of a collated batch (``datamodules.collate`` contract).

        ``generator`` drives the bit flips of self-correction and the condition dropout; ``None`` applies neither
        (deterministic, e.g. for validation).
        """
        config = self.config
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels = batch.get("labels")
        gen_images = batch.get("gen_images")
        schedule = validate_schedule(batch.get("gen_schedule") or config.schedule)
        placeholders = batch.get("gen_placeholder_count") or placeholder_count(schedule, config.placeholder_multiple)
        placeholders = int(placeholders)
        length = token_count(schedule)
        if placeholders < length:
            raise ValueError(f"gen_placeholder_count={placeholders} is smaller than the schedule's {length} tokens")
        spans = self.find_spans(input_ids, attention_mask, placeholders)
        n_spans = spans.rows.numel()
        order = self._match_targets(spans, batch.get("gen_sample_index"), gen_images)
        if config.reference_compat and gen_images is not None:
            labels = reference_text_labels(input_ids, config.image_gen_pad_token_id)
        if labels is None:
            raise ValueError("the batch has no 'labels' (needed for the text loss)")

        embeds = self.embed(input_ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
        dropped = torch.zeros(n_spans, dtype=torch.bool, device=input_ids.device)
        bit_labels = None
        if n_spans:
            targets = gen_images[order].to(embeds.device)
            with torch.no_grad():
                features = self.tokenizer.encode_features(targets.to(next(self.tokenizer.parameters()).dtype))
            if tuple(features.shape[-2:]) != schedule[-1]:
                raise ValueError(
                    f"gen_images of {targets.shape[-2]}x{targets.shape[-1]} px have a {features.shape[-2]}x"
                    f"{features.shape[-1]} latent grid but the schedule ends at {schedule[-1]}"
                )
            corrected = bitwise_self_correction(features.float(), schedule, generator, max_flip=config.max_flip)
            bit_labels = corrected.labels
            if generator is not None and config.condition_drop > 0:
                draws = torch.rand(n_spans, generator=generator, device=generator.device)
                dropped = (draws < config.condition_drop).to(input_ids.device)
            cond = self.start_condition(n_spans)
            if config.reference_compat and bool(dropped.any()):
                cond = torch.where(dropped[:, None], self.start_condition(n_spans, unconditional=True), cond)
            tokens = self.decoder.embed_inputs(cond, corrected.inputs.to(cond.dtype))
            image_embeds = self._placeholder_embeds(tokens, placeholders, schedule).to(embeds.dtype)
            columns = spans.starts[:, None] + 1 + torch.arange(placeholders, device=embeds.device)[None, :]
            embeds = embeds.index_put((spans.rows[:, None].expand_as(columns), columns), image_embeds)

        rows, starts = spans.rows, spans.starts
        llm_ids, llm_mask, llm_grid = input_ids, attention_mask, batch.get("image_grid_thw")
        if n_spans and not config.reference_compat and bool(dropped.any()):
            embeds, llm_ids, llm_mask, rows, starts = self._append_unconditional_rows(
                embeds, input_ids, attention_mask, spans, dropped, image_embeds, placeholders
            )
        positions, _ = mrope_position_ids(self.backbone, llm_ids, llm_mask, llm_grid, config.image_token_id)
        hidden = self.backbone.language_model(
            inputs_embeds=embeds, attention_mask=llm_mask, position_ids=positions, use_cache=False
        ).last_hidden_state

        text = text_cross_entropy(hidden[: input_ids.shape[0], : input_ids.shape[1]], labels, self.lm_head)
        bit_logits = bit_weights = None
        image_loss = text.loss * 0.0
        if n_spans:
            image_columns = starts[:, None] + 1 + torch.arange(length, device=hidden.device)[None, :]
            image_hidden = self.bridge.out_projector(hidden[rows[:, None], image_columns])
            source = self._source_bits(batch, order, schedule, corrected.corrupted_bits)
            if source is not None:
                image_hidden = image_hidden + self.decoder.embed_source(*source).to(image_hidden.dtype)
            context, context_mask = self.project_context(hidden, rows, starts, llm_mask)
            aspect = schedule[-1][0] / schedule[-1][1]
            adaln = self.adaln_condition(cond, context, context_mask)
            bit_logits = self.decoder(image_hidden, adaln, context, context_mask, schedule, aspect)
            if source is not None:
                bit_logits = self.decoder.add_source_logits(bit_logits, *source)
            bit_logits = self.decoder.sequential_logits(bit_logits, bit_labels, schedule)
            per_scale = config.per_scale_loss_weights and not config.reference_compat
            if config.bit_loss_weights != "uniform" and not config.reference_compat:
                bit_weights = corrected.magnitudes
                if config.bit_loss_weights == "residual":
                    bit_weights = bit_weights * corrected.token_weights
            image_loss = image_cross_entropy(bit_logits, bit_labels, schedule, per_scale, bit_weights)
        return TrainingOutput(
            loss=text.loss + config.image_loss_weight * image_loss,
            text_loss=text.loss,
            image_loss=image_loss,
            text_loss_sum=text.total,
            text_token_count=text.count,
            bit_logits=bit_logits,
            bit_labels=bit_labels,
            schedule=schedule,
            span_rows=spans.rows,
            condition_dropped=dropped,
            bit_weights=bit_weights,
        )

    def _source_bits(
        self,
        batch: dict[str, Any],
        order: torch.Tensor,
        schedule: list[tuple[int, int]],
        history: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The spans' source copy bits (N, L, d) and which spans have a source (N,), for ``decoder.source_condition``.

        ``gen_source_images`` (N_gen, 3, S, S) hold, for each generation target, the input image it edits (zeros
        where ``gen_source_mask`` is false). Scale k's copy bits are those that would reproduce the source on top of
        the ``history`` (the bits, self-corrected, the decoder inputs were built from), as in sampling.
        """
        sources = batch.get("gen_source_images")
        if not self.config.decoder.source_condition or sources is None:
            return None
        present = batch.get("gen_source_mask")
        if present is None or present.shape != sources.shape[:1]:
            raise ValueError("gen_source_mask must give one flag per gen_source_images entry")
        sources, present = sources[order], present[order]
        dtype = next(self.tokenizer.parameters()).dtype
        with torch.no_grad():
            features = self.tokenizer.encode_features(sources.to(self.lm_head.weight.device, dtype))
        bits = flatten_bits(copy_bits(features, history, schedule))
        return bits, present.to(bits.device)

    def _placeholder_embeds(
        self, tokens: torch.Tensor, placeholders: int, schedule: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """(N, P, H) LLM inputs of the placeholders: the tokens' ``generation_inputs``, then ``in_projector(0)`` for
        the padding."""
        projected = self.generation_inputs(tokens, schedule)
        extra = placeholders - tokens.shape[1]
        if extra == 0:
            return projected
        padding = self.bridge.in_projector(tokens.new_zeros(1, 1, tokens.shape[-1]))
        return torch.cat((projected, padding.expand(tokens.shape[0], extra, -1)), dim=1)

    def _match_targets(
        self, spans: GenerationSpans, sample_index: torch.Tensor | None, gen_images: torch.Tensor | None
    ) -> torch.Tensor:
        """Index into ``gen_images`` for each span: the k-th span of row r takes row r's k-th target."""
        n_images = 0 if gen_images is None else gen_images.shape[0]
        if spans.rows.numel() != n_images:
            raise ValueError(f"the batch has {spans.rows.numel()} generation spans but {n_images} gen_images")
        if n_images == 0:
            return torch.zeros(0, dtype=torch.long)
        if sample_index is None or sample_index.numel() != n_images:
            raise ValueError("gen_sample_index must give the row of every gen_images entry")
        sample_index = sample_index.to(spans.rows.device)
        order = []
        for row in spans.rows.unique_consecutive().tolist():
            targets = (sample_index == row).nonzero().flatten()
            n_row_spans = int((spans.rows == row).sum())
            if targets.numel() != n_row_spans:
                raise ValueError(f"row {row} has {n_row_spans} generation spans but {targets.numel()} gen_images")
            order.append(targets)
        return torch.cat(order).to(gen_images.device)

    def _append_unconditional_rows(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        spans: GenerationSpans,
        dropped: torch.Tensor,
        image_embeds: torch.Tensor,
        placeholders: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add one row per dropped span: the empty prompt, then the span's image tokens (CFG dropout)."""
        if self.unconditional_prompt_ids is None:
            raise ValueError(
                "condition dropout builds unconditional rows from the empty prompt: call model.attach_tokenizer("
                "tokenizer) first, or set condition_drop=0"
            )
        prompt = torch.tensor(self.unconditional_prompt_ids, device=input_ids.device)
        dropped_index = dropped.nonzero().flatten()
        n_extra = dropped_index.numel()
        extra_length = prompt.numel() + placeholders
        total = max(input_ids.shape[1], extra_length)
        pad = total - input_ids.shape[1]
        new_ids = torch.full((n_extra, total), self.config.pad_token_id, device=input_ids.device)
        new_ids[:, : prompt.numel()] = prompt
        new_ids[:, prompt.numel() : extra_length] = self.config.image_gen_pad_token_id
        new_mask = torch.zeros((n_extra, total), dtype=attention_mask.dtype, device=attention_mask.device)
        new_mask[:, :extra_length] = 1
        new_embeds = self.backbone.get_input_embeddings()(new_ids)
        new_embeds = torch.cat((new_embeds[:, : prompt.numel()], image_embeds[dropped_index],
                                new_embeds[:, extra_length:]), dim=1)
        embeds = torch.cat((nn.functional.pad(embeds, (0, 0, 0, pad)), new_embeds))
        ids = torch.cat((nn.functional.pad(input_ids, (0, pad), value=self.config.pad_token_id), new_ids))
        mask = torch.cat((nn.functional.pad(attention_mask, (0, pad)), new_mask))
        rows = spans.rows.clone()
        starts = spans.starts.clone()
        rows[dropped_index] = input_ids.shape[0] + torch.arange(n_extra, device=rows.device)
        starts[dropped_index] = prompt.numel() - 1
        return embeds, ids, mask, rows, starts

    # ------------------------------------------------------------------ inference (vargpt.generation)

    def chat(self, messages: Sequence[dict[str, str]], images: Sequence[Any] | None = None, **kwargs: Any) -> str:
        """Answer a conversation (understanding); see ``vargpt.generation.chat``."""
        from vargpt.generation import chat

        return chat(self, messages, images=images, **kwargs)

    def generate_images(self, prompts: Sequence[str], **kwargs: Any) -> list[Any]:
        """Text-to-image (and editing with ``images=``); see ``vargpt.generation.generate_images``."""
        from vargpt.generation import generate_images

        return generate_images(self, prompts, **kwargs)

    def reply(self, messages: Sequence[dict[str, str]], images: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """One assistant turn that may interleave text and images; see ``vargpt.generation.reply``."""
        from vargpt.generation import reply

        return reply(self, messages, images=images, **kwargs)
