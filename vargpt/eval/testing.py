"""Tiny random-weight stand-ins for the evaluation models, saved as real local folders.

They exercise the same loaders as the real checkpoints (``save_pretrained`` -> ``from_pretrained``), so tests and
smoke runs check the plumbing on CPU in well under a second per image. Their numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch


def save_tiny_mask2former(folder: str | os.PathLike, seed: int = 0, image_edge: int = 64) -> Path:
    """A random Mask2Former (tiny Swin backbone, 20 queries, hidden 32, 80 classes) plus its image processor.

    ``image_edge`` is stored as the processor's default size; the detector overrides it with its own settings.
    """
    from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig

    from vargpt.eval.geneval_detector import Mask2FormerInstanceSegmenter

    torch.manual_seed(seed)
    backbone = SwinConfig(
        embed_dim=24,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_labels=80,
        num_queries=20,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
    )
    folder = Path(folder)
    Mask2FormerInstanceSegmenter(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": image_edge, "longest_edge": 2 * image_edge}).save_pretrained(
        folder
    )
    return folder


def save_tiny_clip(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A random CLIP (2 layers, width 32, projection 16) with a character-level BPE tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def save_random_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 feature extractor with random weights, saved as a plain state dict.

    torch-fidelity builds the network only together with loading weights (from a file or the internet), so the
    random network is built with loading switched off for this one construction.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInception(FeatureExtractorInceptionV3):
        """Keeps its random initialisation: the weight loading in torch-fidelity's constructor is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001 - torch's signature
            return None

    torch.manual_seed(seed)
    placeholder = Path(path).with_suffix(".empty")
    torch.save({}, placeholder)
    try:
        network = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(placeholder))
    finally:
        placeholder.unlink()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    torch.save({name: tensor.clone() for name, tensor in network.state_dict().items()}, path)
    return path
