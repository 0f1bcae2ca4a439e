"""Hugging Face Hub ids wherever a local folder is accepted: `owner/name[/subfolder]` -> that folder in
huggingface_hub's cache (`snapshot_download`: HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE apply), fetching only the
files the loader reads, never a whole 8B pipeline for its VAE.

A path that exists always wins, and anything that is not an id (absolute, `./x`, one name) is returned as given, so
the loaders' own "not found" errors stay as they are. An id that cannot be had (offline and not cached, no such repo,
no network) is one ConfigError line naming it and saying what to do. Hub folders are read as diffusers or our torch
format (safetensors); our JAX format (an orbax `params/` folder) is read from local folders only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from contentv_common.errors import ConfigError

# owner/name as the Hub spells them, then an optional subfolder (e.g. ByteDance/ContentV-8B/vae)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<sub>[\w.-]+(?:/[\w.-]+)*))?")
INDEX = "*.safetensors.index.json"
TRANSFORMER_CONFIGS = ("config.json", "contentv_config.json")
VAE_CONFIGS = ("config.json",)
# a diffusers text-to-video/image pipeline as our encoders read it (contentv_common.text.sd3_prompt, the VAE loaders):
# the small files first; then the weights of each folder holding some
PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder*/config.json",
    f"text_encoder*/{INDEX}",
    "tokenizer*/*",
    "vae/config.json",
    f"vae/{INDEX}",
)
PIPELINE_TRANSFORMER_FILES = tuple(f"transformer/{p}" for p in (*TRANSFORMER_CONFIGS, INDEX))
PIPELINE_WEIGHTS = ("text_encoder*", "vae", "transformer")


def hub_id(path: str | Path) -> tuple[str, str] | None:
    """(repo, subfolder) when `path` is an `owner/name[/subfolder]` Hub id and no such local path exists, else None.
    A path whose first folder exists here (`runs/tiny/transformer` before the run wrote it) is local, not an id."""
    text = str(path)
    match = HUB_ID.fullmatch(text)
    if match is None or ".." in text.split("/") or Path(text).exists() or Path(text.split("/")[0]).exists():
        return None
    return match["repo"], match["sub"] or ""


def transformer_folder(path: str | Path) -> Path:
    """A transformer checkpoint folder (`load_transformer`'s): a Hub id gets its config and safetensors only."""
    return _model_folder(path, TRANSFORMER_CONFIGS, "transformer")


def vae_folder(path: str | Path) -> Path:
    """A diffusers VAE folder (`load_vae`'s): a Hub id gets its config.json and safetensors only."""
    return _model_folder(path, VAE_CONFIGS, "vae")


def pipeline_folder(path: str | Path, transformer: bool = True) -> Path:
    """A diffusers pipeline folder: a Hub id gets the text encoders, tokenizers, scheduler and VAE, and the
    transformer unless another one is used (`transformer=False`)."""
    found = hub_id(path)
    if found is None:
        return Path(path)
    repo, sub = found
    small = [_under(sub, f) for f in PIPELINE_FILES + (PIPELINE_TRANSFORMER_FILES if transformer else ())]
    deeper = [_under(sub, "*/*/*")]  # nothing a pipeline's loaders read lies deeper than its component folders
    root = download(str(path), repo, small, deeper)
    names = [n for n in PIPELINE_WEIGHTS if transformer or n != "transformer"]
    folders = sorted({f for n in names for f in root.glob(n) if f.is_dir()})
    weights = [_under(sub, w) for f in folders for w in weight_patterns(f, f.name)]
    return download(str(path), repo, small + weights, deeper)


def _model_folder(path: str | Path, configs: Sequence[str], component: str) -> Path:
    """A model folder fetched in two steps: its config files (and safetensors index), then the weights they name;
    a folder without a config (a pipeline's root, a wrong subfolder) fails after a few bytes, not after the repo."""
    found = hub_id(path)
    if found is None:
        return Path(path)
    repo, sub = found
    deeper = [_under(sub, "*/*")]  # only the folder's own files: fnmatch's `*` also spans `/`
    small = [_under(sub, c) for c in (*configs, INDEX)]
    folder = download(str(path), repo, [*small, _under(sub, "model_index.json")], deeper)
    if not any((folder / c).is_file() for c in configs):
        if (folder / "model_index.json").is_file():
            raise ConfigError(f"{path}: a pipeline on the Hub: name its {component} subfolder, e.g. {path}/{component}")
        _raise_if_offline(str(path), repo)
        raise ConfigError(f"{path}: no {' or '.join(configs)} in Hub repo {repo}{_where(sub)}: not a {component}")
    return download(str(path), repo, small + [_under(sub, w) for w in weight_patterns(folder)], deeper)


def weight_patterns(folder: Path, prefix: str = "") -> list[str]:
    """The safetensors a loader reads in `folder` (as safetensors_io.weight_files picks them): the shards its one
    index lists, else every `*.safetensors` (then a variant beside them, e.g. `*.fp16.safetensors`, comes too)."""
    indexes = sorted(folder.glob(INDEX))
    names = ["*.safetensors"]
    if len(indexes) == 1:
        try:
            names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass  # the loader names the broken index once the folder is read
    return [_under(prefix, n) for n in names]


def download(text: str, repo: str, allow: list[str], ignore: list[str]) -> Path:
    """`snapshot_download` of the `allow` globs (repo-relative) -> the folder `text` names in the snapshot; hub
    errors become one ConfigError line naming `text`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        root = snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore)
    except LocalEntryNotFoundError as e:
        _raise_if_offline(text, repo)
        raise ConfigError(f"{text}: no such folder, and Hub repo {repo} cannot be fetched: {_first_line(e)}") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{text}: no such folder, nor a Hub repo this account can read ({repo}: check the id; a gated or private "
            "repo needs `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{text}: Hub repo {repo}: {_first_line(e)}") from None
    sub = text[len(repo) :].strip("/")
    folder = Path(root) / sub
    if not folder.is_dir():
        _raise_if_offline(text, repo)
        raise ConfigError(f"{text}: Hub repo {repo} has no folder {sub!r}")
    return folder


def _raise_if_offline(text: str, repo: str) -> None:
    """Offline, what is missing is missing from the cache: say so, and how to fill it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{text}: no such folder, and Hub repo {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "with the files needed, and HF_HUB_OFFLINE is set: run once without HF_HUB_OFFLINE to download them"
        )


def _under(sub: str, pattern: str) -> str:
    return f"{sub}/{pattern}" if sub else pattern


def _where(sub: str) -> str:
    return f" under {sub}/" if sub else ""


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
