"""Find weights: an explicit folder, the local Hugging Face cache (offline), or bundled weights."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import read_json
from .errors import ImagegenError, WeightsError, WeightsNotFoundError, install_hint
from .weights import safetensors_files

SETTINGS_FILE = "imagegen.json"  # optional per-checkpoint settings beside model_index.json (the FLUX.2 plugin's)

if TYPE_CHECKING:
    from .registry import ModelSpec


def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub computes it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder of a cached repo (refs/<revision> names the commit), if present."""
    repo = repo_cache_dir(repo_id)
    ref = repo / "refs" / revision
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def resolve_weights(spec: ModelSpec, weights: str | Path | None = None) -> Path | None:
    """Where a model's weights are, or a WeightsNotFoundError saying where we looked and what to do."""
    if not spec.needs_weights:
        return None
    if weights is not None:
        path = Path(weights).expanduser()
        if path.exists() and not path.is_dir():
            raise WeightsNotFoundError(f"--weights {weights} is a file; pass the model's folder.")
        uncached = (
            f"No folder '{weights}' and no cached repo at {repo_cache_dir(str(weights))}; "
            f"download it with `imagegen pull {spec.id} --repo {weights}`."
        )
        return _folder_or_snapshot(weights, uncached, f"Weights folder not found: {path}")
    if spec.bundled_weights is not None and Path(spec.bundled_weights).is_dir():
        return Path(spec.bundled_weights)
    if spec.hf_repo:
        snapshot = cached_snapshot(spec.hf_repo)
        if snapshot is not None:
            return snapshot
        raise WeightsNotFoundError(
            f"No weights for '{spec.id}': looked in {repo_cache_dir(spec.hf_repo)}. "
            f"Get them with `imagegen pull {spec.id}` or pass --weights DIR (a diffusers-layout folder)."
        )
    raise WeightsNotFoundError(f"No weights for '{spec.id}': pass --weights DIR (a diffusers-layout folder).")


def resolve_component(source: str | Path, flag: str) -> Path:
    """The folder of one component given apart from the model's weights (`flag`, e.g. --vae): a folder, or the
    cached snapshot of a Hugging Face repo id; WeightsNotFoundError otherwise."""
    uncached = (
        f"{flag} {source}: no such folder and no cached repo at "
        f"{repo_cache_dir(str(source))}; download it with `imagegen pull MODEL --repo "
        f"{source}`."
    )
    return _folder_or_snapshot(source, uncached, f"{flag} {source}: folder not found.")


def _folder_or_snapshot(source: str | Path, uncached: str, missing: str) -> Path:
    """`source` as a folder, or the cached snapshot of the Hugging Face repo id it names; WeightsNotFoundError
    `uncached` when that repo is not downloaded, `missing` when it is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not _looks_like_repo_id(str(source)):
        raise WeightsNotFoundError(missing)
    snapshot = cached_snapshot(str(source))
    if snapshot is None:
        raise WeightsNotFoundError(uncached)
    return snapshot


def weights_present(spec: ModelSpec) -> Path | None:
    """The folder resolve_weights would use without --weights, or None."""
    try:
        return resolve_weights(spec) if spec.needs_weights else None
    except WeightsNotFoundError:
        return None


def missing_files(path: Path) -> list[str]:
    """What a diffusers-layout folder lacks of the files imagegen reads (empty: complete): model_index.json, and
    for each component it names the config, plus the tokenizer.json of tokenizers and the weights (every shard
    an index names) of models. An interrupted download shows up here, not at load time."""
    path = Path(path)
    try:
        index = read_json(path / "model_index.json")
    except WeightsError as e:
        return [f"model_index.json ({e})" if (path / "model_index.json").exists() else "model_index.json"]
    if not isinstance(index, dict):
        return ["model_index.json (not a JSON object)"]
    missing = []
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        folder, kind = path / name, str(entry[1])
        if "Scheduler" in kind:
            needed = ["scheduler_config.json"]
        elif "Tokenizer" in kind:
            needed = ["tokenizer.json"]
        else:
            needed = ["config.json"]
            try:
                safetensors_files(folder)
            except (WeightsError, WeightsNotFoundError):
                missing.append(f"{name}/*.safetensors")
        missing.extend(f"{name}/{f}" for f in needed if not (folder / f).is_file())
    return missing


def weights_identity(spec: ModelSpec, path: Path | None) -> dict[str, str]:
    """What weights made an image: the repo or folder, plus a hash of its configs (for PNG metadata)."""
    if path is None:
        return {"source": "procedural"}
    path = Path(path)
    digest = hashlib.sha256()
    for config in sorted(path.glob("*.json")) + sorted(path.glob("*/config.json")):
        digest.update(config.relative_to(path).as_posix().encode() + b"\0" + config.read_bytes())
    source = str(path)
    if spec.hf_repo and cached_snapshot(spec.hf_repo) == path:
        source = spec.hf_repo
    elif spec.bundled_weights is not None and Path(spec.bundled_weights) == path:
        source = f"bundled:{spec.id}"
    return {"source": source, "config_sha256": digest.hexdigest()[:16]}


def folder_size(path: Path) -> int:
    """Bytes on disk, following the HF cache's symlinks to blobs."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def pull(spec: ModelSpec, repo: str | None = None) -> Path:
    """Download a model's repo into the HF cache with huggingface_hub (the optional `hub` extra)."""
    repo = repo or spec.hf_repo
    if not repo:
        raise ImagegenError(f"Model '{spec.id}' has no Hugging Face repo to pull from.")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise ImagegenError(f"Downloading needs huggingface_hub: {install_hint('hub')}") from None
    try:
        index = Path(hf_hub_download(repo, "model_index.json", cache_dir=hf_cache_dir()))
        patterns = pull_patterns(read_json(index))
        path = Path(snapshot_download(repo, cache_dir=hf_cache_dir(), allow_patterns=patterns))
    except ImagegenError:
        raise
    except Exception as e:  # network, auth (gated repos), disk, a repo without model_index.json
        raise ImagegenError(f"Could not download {repo}: {type(e).__name__}: {e}") from None
    missing = missing_files(path)
    if missing:
        raise ImagegenError(f"{repo} was downloaded to {path} but lacks {', '.join(missing)}.")
    return path


def pull_patterns(index: Any) -> list[str]:
    """What imagegen reads of a diffusers repo: the root's JSON files and, in each component folder the index
    names, its JSON, chat templates and safetensors. Not the single-file checkpoints some repos keep at the root
    (7.75 GB in FLUX.2 Klein 4B's), nor README images."""
    if not isinstance(index, dict):
        raise ImagegenError("model_index.json of the repo is not a JSON object.")
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[-1:] != [None]]
    return ["model_index.json", SETTINGS_FILE] + [
        f"{c}/*.{ext}" for c in sorted(components) for ext in ("json", "jinja", "safetensors")
    ]


def remove(spec: ModelSpec) -> Path:
    """Delete a model's cached repo; returns the folder removed."""
    if not spec.hf_repo or not repo_cache_dir(spec.hf_repo).is_dir():
        raise WeightsNotFoundError(f"No cached weights for '{spec.id}'.")
    folder = repo_cache_dir(spec.hf_repo)
    shutil.rmtree(folder)
    return folder
