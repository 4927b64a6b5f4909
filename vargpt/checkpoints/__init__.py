"""Checkpoint IO and the key maps that bring upstream weights into our modules.

``core`` holds the format-independent machinery (rename tables, strict loading with a report, safe ``.pth``
reading, atomic sharded safetensors); one module per upstream format holds that format's table.
"""

from vargpt.checkpoints.core import (
    CheckpointError,
    KeyMap,
    LoadReport,
    Rename,
    compare_state_dict,
    iter_safetensors_folder,
    load_state_dict_strict,
    load_torch_file,
    read_safetensors_folder,
    write_safetensors_folder,
)

__all__ = [
    "CheckpointError",
    "KeyMap",
    "LoadReport",
    "Rename",
    "compare_state_dict",
    "iter_safetensors_folder",
    "load_state_dict_strict",
    "load_torch_file",
    "read_safetensors_folder",
    "write_safetensors_folder",
]
