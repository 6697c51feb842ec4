"""Weights resolution against a fake local Hugging Face cache (never the network)."""

from __future__ import annotations

import pytest

import imagegen
from imagegen import hub


def spec(**kw) -> imagegen.ModelSpec:
    return imagegen.ModelSpec(id="acme-1", family="acme", load=lambda *a, **k: None, **kw)


def fake_cache(root, repo: str, commit: str = "abc123", files=("model_index.json",)):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    blobs = repo_dir / "blobs"
    blobs.mkdir()
    for name in files:
        blob = blobs / f"sha-{name}"
        blob.write_text("{}")
        (snapshot / name).symlink_to(blob)  # the real cache links snapshot files to blobs
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def test_cache_location_follows_env(cache, monkeypatch, tmp_path):
    assert hub.hf_cache_dir() == cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other"))
    assert hub.hf_cache_dir() == tmp_path / "other"


def test_official_repo_found_in_cache(cache):
    snapshot = fake_cache(cache, "acme/model-1")
    assert hub.resolve_weights(spec(hf_repo="acme/model-1")) == snapshot
    assert hub.weights_present(spec(hf_repo="acme/model-1")) == snapshot
    assert hub.weights_identity(spec(hf_repo="acme/model-1"), snapshot)["source"] == "acme/model-1"
    assert hub.folder_size(snapshot) == 2


def test_explicit_folder_and_repo_id(cache, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    assert hub.resolve_weights(spec(), folder) == folder
    snapshot = fake_cache(cache, "someone/finetune")
    assert hub.resolve_weights(spec(), "someone/finetune") == snapshot
    with pytest.raises(imagegen.WeightsNotFoundError, match="imagegen pull acme-1 --repo someone/missing"):
        hub.resolve_weights(spec(), "someone/missing")
    (tmp_path / "file.bin").write_text("")
    with pytest.raises(imagegen.WeightsNotFoundError, match="is a file"):
        hub.resolve_weights(spec(), tmp_path / "file.bin")


def test_missing_weights_message_says_where_and_how(cache):
    with pytest.raises(imagegen.WeightsNotFoundError) as e:
        hub.resolve_weights(spec(hf_repo="acme/model-1"))
    assert str(cache / "models--acme--model-1") in str(e.value) and "imagegen pull acme-1" in str(e.value)
    assert hub.weights_present(spec(hf_repo="acme/model-1")) is None


def test_bundled_weights_and_procedural(tmp_path, cache):
    assert hub.resolve_weights(spec(bundled_weights=tmp_path)) == tmp_path
    assert hub.resolve_weights(spec(needs_weights=False)) is None


def test_remove_deletes_the_cached_repo(cache):
    fake_cache(cache, "acme/model-1")
    removed = hub.remove(spec(hf_repo="acme/model-1"))
    assert not removed.exists()
    with pytest.raises(imagegen.WeightsNotFoundError):
        hub.remove(spec(hf_repo="acme/model-1"))
