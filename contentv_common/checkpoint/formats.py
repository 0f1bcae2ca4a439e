"""Transformer checkpoints on disk, framework-free: the diffusers folder and our own safetensors folder.

Both are read as a `TensorSource`: the model config plus a stream of (canonical name, numpy array in torch layout).
Every loader and converter goes through it and through `check_keys`, so key and shape errors read the same everywhere.

Formats:
- `diffusers`: `config.json` + `diffusion_pytorch_model*.safetensors` (sharded with an index or not), diffusers names.
  This is the layout of the official SD3.5-Large and ContentV-8B transformer folders.
- `torch`: `contentv_config.json` + `model*.safetensors` with canonical names (the torch twin's state_dict), or the
  per-rank files `shard-*.safetensors` of a multi-process checkpoint (contentv_torch_npu.sharded_checkpoint).
- `jax`: `contentv_config.json` + an orbax folder `params/`. A backend's own format is read and written by that
  backend: `contentv_jax` registers it with `register_format` on import, so this layer never imports a framework.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE, ParamTable
from contentv_common.checkpoint.safetensors_io import (
    AtomicFolder,
    iter_tensors,
    tensor_index,
    weight_files,
    write_sharded,
)
from contentv_common.config.model import ModelConfig, from_dict, to_dict
from contentv_common.errors import CheckpointError, ConfigError, UnknownParameterError

OUR_CONFIG = "contentv_config.json"
POS_TABLE = "patch_embed.pos_table"

# diffusers config.json keys we read, and the SD3.5-Large values a ContentV (`SD3Transformer3DModel`) config omits.
_SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    dual_attention_layers=[],
    qk_norm="rms_norm",
)
# diffusers' own constructor defaults of SD3Transformer2DModel, for keys an SD3 config.json may omit.
_SD3_2D_DEFAULTS = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=18,
    attention_head_dim=64,
    num_attention_heads=18,
    joint_attention_dim=4096,
    caption_projection_dim=1152,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=96,
    dual_attention_layers=[],
    qk_norm=None,
)
CONTENTV_CLASS = "SD3Transformer3DModel"
SD3_CLASS = "SD3Transformer2DModel"


def config_from_diffusers(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a diffusers transformer config.json (SD3/SD3.5 image model or ContentV video model)."""
    cls = raw.get("_class_name", SD3_CLASS)
    if cls not in (SD3_CLASS, CONTENTV_CLASS):
        raise ConfigError(f"{where}: _class_name {cls!r} is not {SD3_CLASS} or {CONTENTV_CLASS}")
    values: dict[str, Any] = dict(_SD35_LARGE if cls == CONTENTV_CLASS else _SD3_2D_DEFAULTS)
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in values:
            raise ConfigError(f"{where}: {key}: unsupported transformer config key")
        values[key] = value
    if values.pop("dual_attention_layers"):
        raise ConfigError(f"{where}: dual_attention_layers: MMDiT-X dual attention (SD3.5-Medium) is not supported")
    hidden = values["num_attention_heads"] * values["attention_head_dim"]
    if values.get("out_channels") is None:
        values["out_channels"] = values["in_channels"]
    if values.pop("caption_projection_dim") != hidden:
        raise ConfigError(f"{where}: caption_projection_dim must equal num_attention_heads x attention_head_dim")
    values.update(hidden_size=hidden, pos_embed="sincos_3d" if cls == CONTENTV_CLASS else "sd3_2d")
    try:
        return from_dict(ModelConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_to_diffusers(config: ModelConfig) -> dict[str, Any]:
    """A diffusers config.json for `config`; sincos_3d writes ContentV's `SD3Transformer3DModel` class name."""
    return {
        "_class_name": CONTENTV_CLASS if config.pos_embed == "sincos_3d" else SD3_CLASS,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.num_layers,
        "attention_head_dim": config.attention_head_dim,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_projection_dim,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": [],
        "qk_norm": config.qk_norm,
    }


def read_our_config(folder: Path) -> ModelConfig:
    path = Path(folder) / OUR_CONFIG
    try:
        return from_dict(ModelConfig, json.loads(path.read_text()))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def write_our_config(folder: Path, config: ModelConfig) -> None:
    (Path(folder) / OUR_CONFIG).write_text(json.dumps(to_dict(config), indent=2))


def detect_format(path: str | Path) -> str:
    """'diffusers', 'torch' or 'jax', from the files in the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if (path / "config.json").exists():
        return "diffusers"
    if (path / OUR_CONFIG).exists():
        return "jax" if (path / "params").is_dir() else "torch"
    if (path / "transformer" / "config.json").exists():
        raise CheckpointError(f"{path}: this is a pipeline folder; pass its transformer/ subfolder")
    raise CheckpointError(f"{path}: neither config.json (diffusers) nor {OUR_CONFIG} (contentv) found")


Index = tuple[slice, ...]


@dataclass
class TensorSource:
    """A checkpoint opened for streaming: config, canonical shapes/dtypes, and a per-tensor iterator (the formats on
    disk take `tensors(skip)`: the canonical names in `skip` are left out, unread where the format allows it).

    `config` is the model's config (ModelConfig for transformers; other models, e.g. the VAE, bring their own).
    `read(name, index)`, where the format allows it, reads one slice of one tensor (torch layout) and nothing else:
    how a sharded loader puts every device's part in place without a whole copy on the host.
    """

    path: Path
    config: Any
    shapes: dict[str, tuple[int, ...]]  # canonical name -> torch-layout shape
    dtypes: dict[str, str]
    tensors: Callable[..., Iterator[tuple[str, np.ndarray]]]  # (skip=()) -> canonical name, torch-layout array
    read: Callable[[str, Index], np.ndarray] | None = None


@dataclass(frozen=True)
class CheckpointFormat:
    """A backend's own checkpoint format: open a folder as a TensorSource; write canonical tensors as a folder
    (`write(folder, config, tensors, overwrite)`)."""

    open: Callable[[Path], TensorSource]
    write: Callable[[Path, ModelConfig, Iterator[tuple[str, np.ndarray]], bool], Path]


_FORMATS: dict[str, CheckpointFormat] = {}
_PROVIDERS = {"jax": "contentv_jax"}  # for the error message only: who registers which format


def register_format(name: str, fmt: CheckpointFormat) -> None:
    """Called by a backend package on import (contentv_jax registers "jax")."""
    _FORMATS[name] = fmt


def checkpoint_format(name: str, path: str | Path = "") -> CheckpointFormat:
    if name not in _FORMATS:
        provider = _PROVIDERS.get(name, "a backend package")
        raise CheckpointError(
            f"{path}: the {name!r} checkpoint format is read and written by {provider}: install it and import it first"
        )
    return _FORMATS[name]


def canonical_keys(keys: list[str], table: ParamTable, path: Path, from_diffusers: bool) -> dict[str, str]:
    """Checkpoint key -> canonical name; a key no rule matches is a CheckpointError naming the file and key."""
    out = {}
    for key in keys:
        try:
            p = table.from_diffusers(key) if from_diffusers else table.from_canonical(key)
        except UnknownParameterError:
            raise CheckpointError(
                f"{path}: unexpected key {key!r} (no rule in the {table.name} parameter table)"
            ) from None
        out[key] = p.canonical
    return out


def open_safetensors_source(path: str | Path, table: ParamTable = TRANSFORMER_TABLE) -> TensorSource:
    """Open a diffusers or `torch`-format folder (safetensors) without reading tensor data."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "diffusers":
        raw_config = json.loads((path / "config.json").read_text())
        config = config_from_diffusers(raw_config, str(path / "config.json"))
        files = weight_files(path, "diffusion_pytorch_model")
    elif fmt == "torch":
        config = read_our_config(path)
        shards = sorted(path.glob("shard-*.safetensors"))
        if shards:
            return rank_shards_source(path, config, shards, table)
        files = weight_files(path, "model")
    else:
        raise CheckpointError(f"{path}: a jax (orbax) checkpoint; open it with open_checkpoint")
    return stream_source(path, config, files, table, from_diffusers=fmt == "diffusers")


def stream_source(
    path: Path,
    config: Any,
    files: list[Path],
    table: ParamTable,
    from_diffusers: bool = True,
    ignored_suffixes: tuple[str, ...] = (),
    renamed: dict[str, str] | None = None,
) -> TensorSource:
    """A TensorSource over safetensors files, keys renamed through `table`: headers are read now, data on iteration.

    Keys ending in `ignored_suffixes` (recomputed buffers some writers save) are skipped; `renamed` maps stored keys
    to the names the table knows (another spelling of a tied weight); any other unknown key is a CheckpointError
    naming the file and key.
    """
    index = {k: v for k, v in tensor_index(files).items() if not k.endswith(ignored_suffixes)}
    spelled = {key: (renamed or {}).get(key, key) for key in index}
    canonical = canonical_keys(list(spelled.values()), table, path, from_diffusers)
    names = {key: canonical[spelled[key]] for key in index}
    keys = {name: key for key, name in names.items()}

    def tensors(skip: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
        wanted = set(names) - {keys[name] for name in skip}
        for key, array in iter_tensors(files, wanted):
            yield names[key], array

    def read(name: str, where: Index) -> np.ndarray:
        return read_slice(index[keys[name]].file, keys[name], where)

    return TensorSource(
        path=path,
        config=config,
        shapes={names[k]: tuple(v.shape) for k, v in index.items()},
        dtypes={names[k]: v.dtype for k, v in index.items()},
        tensors=tensors,
        read=read,
    )


def memory_source(
    path: Path, config: Any, arrays: dict[str, np.ndarray], table: ParamTable, from_diffusers: bool = True
) -> TensorSource:
    """A TensorSource over arrays held in memory under their checkpoint (diffusers / transformers) or canonical names:
    how weights drawn in numpy (contentv_common.tiny_models) load through the same checks as files."""
    names = canonical_keys(list(arrays), table, path, from_diffusers)
    by_name = {names[k]: v for k, v in arrays.items()}
    return TensorSource(
        path=path,
        config=config,
        shapes={k: tuple(v.shape) for k, v in by_name.items()},
        dtypes={k: str(v.dtype) for k, v in by_name.items()},
        tensors=lambda: iter(by_name.items()),
        read=lambda name, where: by_name[name][where],
    )


def read_slice(file: Path, key: str, where: Index) -> np.ndarray:
    """One slice of one safetensors tensor. The file is opened per call: its memory map (resident pages count as the
    process's memory) is dropped at once, so reading a whole model never holds a shard's pages."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            return f.get_slice(key)[where] if where else f.get_tensor(key)  # a scalar has no slice
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from None


DCP_SHARDING = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint's safetensors header key: each chunk's offsets


Chunks = dict[str, list[tuple[Path, tuple[int, ...], tuple[int, ...]]]]  # key -> (file, offsets, shape) per chunk


def rank_shard_chunks(files: list[Path]) -> tuple[Chunks, dict[str, tuple[int, ...]], dict[str, str]]:
    """Where every tensor's chunks are in the per-rank files of a multi-process torch checkpoint (offsets from each
    file's header), with the full shapes and dtypes; a chunk missing (a rank's file lost) is a CheckpointError."""
    chunks: Chunks = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                offsets = json.loads((f.metadata() or {}).get(DCP_SHARDING, "{}"))
                for key in f.keys():
                    part = f.get_slice(key)
                    shape = tuple(part.get_shape())
                    start = tuple(offsets.get(key, {}).get("saved_offsets", [0] * len(shape)))
                    chunks.setdefault(key, []).append((file, start, shape))
                    end = tuple(o + n for o, n in zip(start, shape, strict=True))
                    shapes[key] = tuple(map(max, shapes.get(key, end), end))
                    dtypes[key] = part.get_dtype()
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: cannot read checkpoint shard: {e}") from None
    for key, parts in chunks.items():
        if sum(int(np.prod(shape)) for _, _, shape in parts) != int(np.prod(shapes[key])):
            raise CheckpointError(
                f"{files[0].parent}: the shard files do not cover {key!r} (a rank's file is missing?)"
            )
    return chunks, shapes, dtypes


def iter_rank_shards(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, full array) of per-rank shard files, assembled one tensor at a time."""
    chunks, shapes, _ = rank_shard_chunks(files)
    for key in sorted(chunks):
        full = None
        for file, start, shape in chunks[key]:
            part = read_slice(file, key, tuple(slice(None) for _ in shape))
            full = np.empty(shapes[key], part.dtype) if full is None else full
            full[tuple(slice(o, o + n) for o, n in zip(start, shape, strict=True))] = part
        assert full is not None  # every key has at least one chunk
        yield key, full


def rank_shards_source(path: Path, config: Any, files: list[Path], table: ParamTable) -> TensorSource:
    """The per-rank files of a multi-process torch checkpoint's part as a TensorSource (full tensors, one at a time)."""
    _, shapes, dtypes = rank_shard_chunks(files)
    names = canonical_keys(list(shapes), table, path, from_diffusers=False)

    def tensors(skip: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
        for key, array in iter_rank_shards(files):
            if names[key] not in skip:
                yield names[key], array

    return TensorSource(
        path=path,
        config=config,
        shapes={names[k]: v for k, v in shapes.items()},
        dtypes={names[k]: v for k, v in dtypes.items()},
        tensors=tensors,
    )


def open_checkpoint(path: str | Path) -> TensorSource:
    """Any transformer checkpoint folder as a TensorSource; a backend's own format (jax) needs that backend imported."""
    fmt = detect_format(path)
    if fmt in ("diffusers", "torch"):
        return open_safetensors_source(path)
    return checkpoint_format(fmt, path).open(Path(path))


def check_keys(
    source: TensorSource, expected: dict[str, tuple[int, ...]], table: ParamTable = TRANSFORMER_TABLE
) -> set[str]:
    """Compare a checkpoint's canonical shapes with the model's; return the keys to skip.

    Raises CheckpointError listing every missing key, unexpected key and shape mismatch (both shapes). The only
    tolerated extra is SD3's fixed 2D position table when the model uses 3D sin-cos positions (image -> video start).
    """
    skip = set()
    if POS_TABLE in source.shapes and POS_TABLE not in expected:
        skip.add(POS_TABLE)
    problems = []
    for key in sorted(set(expected) - set(source.shapes)):
        problems.append(
            f"missing key {key!r} (diffusers {table.from_canonical(key).diffusers!r}), "
            f"model shape {tuple(expected[key])}"
        )
    for key in sorted(set(source.shapes) - set(expected) - skip):
        problems.append(
            f"unexpected key {key!r} (diffusers {table.from_canonical(key).diffusers!r}), "
            f"checkpoint shape {tuple(source.shapes[key])}"
        )
    for key in sorted(set(source.shapes) & set(expected)):
        if tuple(source.shapes[key]) != tuple(expected[key]):
            problems.append(
                f"wrong shape for key {key!r}: checkpoint {tuple(source.shapes[key])} vs model {tuple(expected[key])}"
            )
    if problems:
        raise CheckpointError(f"{source.path}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return skip


def write_diffusers(
    folder: str | Path,
    config: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    table: ParamTable = TRANSFORMER_TABLE,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write canonical tensors as a diffusers transformer folder (config.json + sharded safetensors)."""
    with AtomicFolder(folder, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_diffusers(config), indent=2))
        renamed = ((table.from_canonical(k).diffusers, v) for k, v in tensors)
        write_sharded(renamed, tmp, "diffusion_pytorch_model", max_shard_bytes, metadata={"format": "pt"})
    return Path(folder)


def write_torch(
    folder: str | Path,
    config: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write canonical tensors as our torch-format folder (contentv_config.json + model*.safetensors)."""
    with AtomicFolder(folder, overwrite) as tmp:
        write_our_config(tmp, config)
        write_sharded(tensors, tmp, "model", max_shard_bytes, metadata={"format": "pt"})
    return Path(folder)
