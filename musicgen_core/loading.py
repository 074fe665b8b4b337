"""Find a checkpoint directory (a path or a hub id in the local Hugging Face cache) and read its tensors.

Checkpoint keys are renamed to this package's module names by a prefix table, weight norm is folded into
plain weights, and every tensor is checked against the model: nothing missing, nothing unexpected, every
shape equal. Errors name the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, MusicGenConfig

REQUIRED_FILES = ("config.json", "spiece.model")

# checkpoint prefix -> our module prefix; the first match wins.
KEY_PREFIXES = (
    ("text_encoder.encoder.final_layer_norm.", "text_encoder.final_layer_norm."),
    ("text_encoder.encoder.block.", "text_encoder.block."),
    ("text_encoder.shared.", "text_encoder.shared."),
    ("decoder.model.decoder.", "decoder."),
    ("decoder.lm_heads.", "decoder.lm_heads."),
    ("audio_encoder.", "audio_encoder."),
    ("enc_to_dec_proj.", "enc_to_dec_proj."),
)

# Tensors the published files carry that inference does not use.
IGNORED_SUFFIXES = (".codebook.embed_avg", ".codebook.cluster_size", ".codebook.inited",
                    "embed_positions.weights")
IGNORED_KEYS = ("text_encoder.encoder.embed_tokens.weight",)  # tied to text_encoder.shared.weight

WEIGHT_NORM_STYLES = ((".weight_g", ".weight_v"),
                      (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A directory as given, or the cached snapshot of a hub id such as 'facebook/musicgen-small'."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: not a checkpoint directory (expected a folder with config.json, "
                              "model.safetensors and spiece.model, or a hub id like facebook/musicgen-small)")
    repo = hub_cache_dir() / ("models--" + text.replace("/", "--"))
    snapshots = repo / "snapshots"
    candidates = []
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "config.json").is_file():
            return snapshot
    raise CheckpointError(
        f"{text}: not found in the local Hugging Face cache ({repo}); this program never downloads. "
        f"Fetch it on a machine with network access, e.g. `huggingface-cli download {text}` "
        f"(or `hf download {text}`), then copy the cache folder here or point HF_HUB_CACHE/HF_HOME at it, "
        "or pass the snapshot directory itself with --model DIR.")


def read_config(directory: Path) -> MusicGenConfig:
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing (a MusicGen checkpoint needs "
                                  "config.json, generation_config.json, model.safetensors and spiece.model)")
    raw = _read_json(directory / "config.json")
    generation = directory / "generation_config.json"
    generation_raw = _read_json(generation) if generation.is_file() else {}
    try:
        return MusicGenConfig.from_dict(raw, generation_raw, name=directory.name)
    except KeyError as missing:
        raise CheckpointError(f"{directory / 'config.json'}: missing key {missing}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in {index.name})")
        return files
    if list(directory.glob("*.bin")):
        raise CheckpointError(f"{directory}: only PyTorch .bin weights found; convert them to model.safetensors")
    raise CheckpointError(f"{directory / 'model.safetensors'}: missing (nor model.safetensors.index.json)")


def rename_key(key: str) -> str | None:
    for source, target in KEY_PREFIXES:
        if key.startswith(source):
            return target + key[len(source):]
    return None


def read_state_dict(directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every used tensor under our module names, weight norm folded, cast to dtype (codes stay exact)."""
    raw: dict[str, tuple[torch.Tensor, Path]] = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as handle:  # memory-mapped; tensors read one at a time
            for key in handle.keys():
                if key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES):
                    continue
                raw[key] = (handle.get_tensor(key), file)
    state: dict[str, torch.Tensor] = {}
    for key in list(raw):
        if key not in raw:
            continue
        folded = _fold_weight_norm(key, raw)
        if folded is not None:
            name, tensor, file = folded
        else:
            tensor, file = raw.pop(key)
            name = key
        ours = rename_key(name)
        if ours is None:
            raise CheckpointError(f"{file}: unexpected tensor {key!r} (not part of a MusicGen checkpoint)")
        state[ours] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _fold_weight_norm(key: str, raw: dict) -> tuple[str, torch.Tensor, Path] | None:
    for g_suffix, v_suffix in WEIGHT_NORM_STYLES:
        for suffix in (g_suffix, v_suffix):
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                g_key, v_key = base + g_suffix, base + v_suffix
                if g_key not in raw or v_key not in raw:
                    missing = v_key if g_key in raw else g_key
                    raise CheckpointError(f"{raw[key][1]}: tensor {missing!r} missing (weight norm needs both "
                                          f"{g_key!r} and {v_key!r})")
                (g, file), (v, _) = raw.pop(g_key), raw.pop(v_key)
                # weight = g * v / ||v||, norm over every dim but 0 (torch.nn.utils weight_norm's default)
                weight = torch._weight_norm(v.float(), g.float(), 0).to(v.dtype)
                name = base[: -len(".parametrizations")] if base.endswith(".parametrizations") else base
                return name + ".weight", weight, file
    return None


def check_and_load(module: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Strict load: every parameter present with its exact shape, no tensor left over."""
    expected = dict(module.state_dict())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]!r} missing from the weights"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json "
                                  f"implies {tuple(expected[name].shape)}")
    module.load_state_dict(state, strict=True, assign=True)
