"""The format-independent checkpoint machinery: rename tables, strict loading, safe .pth reading, safetensors IO."""

import json

import pytest
import torch
from torch import nn

from vargpt.checkpoints import (
    CheckpointError,
    KeyMap,
    Rename,
    compare_state_dict,
    iter_safetensors_folder,
    load_state_dict_strict,
    load_torch_file,
    read_safetensors_folder,
    write_safetensors_folder,
)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        self.head = nn.Linear(4, 2)


CHUNKED = KeyMap(
    rules=(
        Rename(r"chunks\.(\d+)\.module\.(\d+)\.(.*)", lambda m: f"blocks.{2 * int(m[1]) + int(m[2])}.{m[3]}"),
        Rename(r"out\.(weight|bias)", r"head.\1"),
    ),
    drop=(r".*\.zero_bias",),
    name="chunked",
)


def chunked_state_dict(model: TwoLayers) -> dict[str, torch.Tensor]:
    out = {}
    for n, block in enumerate(model.blocks):
        for name, tensor in block.state_dict().items():
            out[f"chunks.{n // 2}.module.{n % 2}.{name}"] = tensor
    out["out.weight"], out["out.bias"] = model.head.weight, model.head.bias
    out["chunks.0.module.0.zero_bias"] = torch.zeros(4)
    return out


def test_key_map_renames_with_index_arithmetic_and_drops():
    source = TwoLayers()
    mapped, dropped, unmatched = CHUNKED.apply(chunked_state_dict(source))
    assert dropped == ["chunks.0.module.0.zero_bias"]
    assert unmatched == []
    target = TwoLayers()
    report = load_state_dict_strict(target, mapped, source="chunked")
    assert report.ok and report.loaded == len(target.state_dict())
    x = torch.randn(3, 4)
    for a, b in zip(source.blocks, target.blocks):
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_key_map_rejects_two_sources_for_one_target():
    clash = KeyMap(rules=(Rename(r"a|b", "x"),), name="clash")
    with pytest.raises(CheckpointError, match="'a' and 'b'"):
        clash.apply({"a": torch.zeros(1), "b": torch.zeros(1)})


def test_rename_transform_applies_to_tensor():
    pick_row = KeyMap(rules=(Rename(r"table", "vector", transform=lambda t: t[2]),))
    mapped, _, _ = pick_row.apply({"table": torch.arange(12.0).view(4, 3)})
    torch.testing.assert_close(mapped["vector"], torch.tensor([6.0, 7.0, 8.0]))


def test_strict_load_reports_missing_unexpected_and_shapes():
    model = TwoLayers()
    state = dict(model.state_dict())
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["blocks.0.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(TwoLayers(), state, source="broken.pth")
    message = str(error.value)
    assert "broken.pth" in message
    assert "head.bias" in message and "extra.weight" in message
    assert "blocks.0.weight: checkpoint (5, 4) vs module (4, 4)" in message


def test_strict_load_allows_named_missing_keys_only():
    model = TwoLayers()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    report = load_state_dict_strict(TwoLayers(), state, source="partial", allow_missing=[r"head\..*"])
    assert report.ok and report.missing == []
    with pytest.raises(CheckpointError, match="blocks.3.bias"):
        state.pop("blocks.3.bias")
        load_state_dict_strict(TwoLayers(), state, source="partial", allow_missing=[r"head\..*"])


def test_compare_state_dict_on_shapes_only():
    report = compare_state_dict({"a": (2, 3), "b": (1,)}, {"a": (2, 3), "c": (4,)}, source="meta")
    assert report.missing == ["b"] and report.unexpected == ["c"] and report.loaded == 1


def test_load_into_meta_module_with_assign():
    source = TwoLayers()
    with torch.device("meta"):
        target = TwoLayers()
    load_state_dict_strict(target, source.state_dict(), source="mem", assign=True)
    assert not target.head.weight.is_meta
    torch.testing.assert_close(target.head.weight, source.head.weight)


def test_load_torch_file_entry_and_errors(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"trainer": {"model": {"w": torch.ones(2)}}, "step": 3}, path)
    assert torch.equal(load_torch_file(path, entry="trainer.model")["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        load_torch_file(path, entry="ema")
    with pytest.raises(CheckpointError, match="not a flat name -> tensor"):
        load_torch_file(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_file(tmp_path / "missing.pth")


def test_load_torch_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"w": torch.ones(1), "obj": nn.Linear(1, 1)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_torch_file(path)


def test_safetensors_folder_round_trip_single_and_sharded(tmp_path):
    model = TwoLayers()
    state = dict(model.state_dict())
    state["tied"] = state["blocks.0.weight"][:2]  # shares storage: must be stored as its own tensor
    single = write_safetensors_folder(state, tmp_path / "single", extra_files={"config.json": "{}"})
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    sharded = write_safetensors_folder(state, tmp_path / "sharded", max_shard_bytes=100)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(list(iter_safetensors_folder(sharded))) == len(set(index["weight_map"].values()))
    for folder in (single, sharded):
        loaded = read_safetensors_folder(folder)
        assert loaded.keys() == state.keys()
        for key in state:
            torch.testing.assert_close(loaded[key], state[key])


def test_safetensors_folder_replaced_atomically(tmp_path):
    folder = tmp_path / "export"
    write_safetensors_folder({"a": torch.zeros(2)}, folder)

    class Exploding(dict):
        def items(self):
            yield "b", torch.ones(2)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_safetensors_folder(Exploding(), folder)
    assert torch.equal(read_safetensors_folder(folder)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_read_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_safetensors_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        read_safetensors_folder(tmp_path / "empty")
