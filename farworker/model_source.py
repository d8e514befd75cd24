"""Where the served model's files come from: the embedded tiny model, a local directory, or the hub.

Hub downloads go through huggingface_hub (it honours HF_ENDPOINT and HF_TOKEN). Before the first byte,
we check the two things that otherwise fail late and leave half-written files: a gated repository
without a token, and a download bigger than the disk budget or the free disk.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Callable
from pathlib import Path

from farworker.config import GATED_MODEL_PREFIXES, ConfigError, WorkerConfig

# What a server needs: config, weights (safetensors preferred), tokenizer for clients on the same host.
WANTED = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
          "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FALLBACK_WEIGHTS = ("*.bin", "pytorch_model.bin.index.json")


def resolve_model(config: WorkerConfig, on_progress: Callable[[int, int], None] | None = None) -> str:
    """A path or repo id petals can load; downloads hub files into config.cache_dir first."""
    if config.is_tiny_model:
        from farworker.tiny_model import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(config.cache_dir))
    if config.is_local_model:
        return str(Path(config.model_name).resolve())
    download_hub_model(config, on_progress)
    return config.model_name


def download_hub_model(config: WorkerConfig, on_progress: Callable[[int, int], None] | None = None) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo, token = config.model_name, config.hf_token or None
    if token is None and config.model_name.startswith(GATED_MODEL_PREFIXES):
        raise ConfigError([f"HF_TOKEN is required for the gated model {repo}: expected a Hugging Face token "
                           "of an account that accepted the model's license"])
    try:
        info = HfApi().model_info(repo, files_metadata=True, token=token)
    except RepositoryNotFoundError:
        raise ConfigError([f"FARLABS_MODEL_NAME={repo!r} was not found on the hub: expected a model id "
                           "such as meta-llama/Llama-2-7b-chat-hf"]) from None
    if info.gated and token is None:
        raise ConfigError([f"HF_TOKEN is required for the gated model {repo}: expected a Hugging Face token"])
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    chosen = select_files(files)
    total = sum(files[name] for name in chosen)
    budget = config.max_disk_space
    if budget is not None and total > budget:
        raise ConfigError([f"FARLABS_MAX_DISK_SPACE={budget / 1e9:.2f}GB is too small for {repo}: expected at "
                           f"least {total / 1e9:.2f}GB"])
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    done = downloaded_bytes(config.cache_dir, repo)
    free = shutil.disk_usage(config.cache_dir).free
    if total - done > free:
        raise ConfigError([f"FARLABS_CACHE_DIR={str(config.cache_dir)!r} has {free / 1e9:.2f}GB free: expected "
                           f"{(total - done) / 1e9:.2f}GB for {repo}"])

    monitor = (lambda: on_progress(downloaded_bytes(config.cache_dir, repo), total)) if on_progress else None
    try:
        for name in chosen:
            if monitor:
                monitor()
            hf_hub_download(repo, name, revision=info.sha, cache_dir=str(config.cache_dir), token=token)
    except GatedRepoError:
        raise ConfigError([f"HF_TOKEN was refused for the gated model {repo}: expected a token of an account "
                           "that accepted the model's license"]) from None
    except HfHubHTTPError as error:
        raise RuntimeError(f"downloading {repo} failed: {error}") from None
    if monitor:
        monitor()


def select_files(files: dict[str, int]) -> list[str]:
    def matching(patterns):
        return sorted(name for name in files if any(fnmatch.fnmatch(name, p) for p in patterns))

    chosen = matching(WANTED)
    if not any(name.endswith(".safetensors") for name in chosen):
        chosen += matching(FALLBACK_WEIGHTS)
    return chosen


def repo_cache_dir(cache_dir: Path, repo: str) -> Path:
    return cache_dir / ("models--" + repo.replace("/", "--"))


def downloaded_bytes(cache_dir: Path, repo: str) -> int:
    """Bytes on disk for this repo, finished blobs and the partial one being written."""
    blobs = repo_cache_dir(cache_dir, repo) / "blobs"
    if not blobs.is_dir():
        return 0
    return sum(entry.stat().st_size for entry in blobs.iterdir() if entry.is_file())
