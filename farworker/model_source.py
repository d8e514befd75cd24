"""Where the served model's files come from: the embedded tiny model, a local directory, or the hub.

Hub downloads go through huggingface_hub (it honours HF_ENDPOINT; the token is HF_TOKEN, nothing else).
Before the first byte is written we ask the hub what the download is and refuse early what would
otherwise fail late and leave half-written files behind:

- a gated repository (the hub's model info says `gated`, or it answers 401 without a token) and no
  HF_TOKEN, or a token the hub refuses for it (403 GatedRepo);
- files larger than FARLABS_MAX_DISK_SPACE (together with what else the cache holds) or than the free
  space on the cache's disk.

Files land in the standard hub cache layout under FARLABS_CACHE_DIR (blobs/, snapshots/<commit>/), are
downloaded resumably (an interrupted download continues from its `.incomplete` blob at the next start),
and the result is the local snapshot directory: petals then loads config and blocks from disk and never
asks the hub again. A fully downloaded snapshot is recorded, so a restart with the hub unreachable (or
HF_HUB_OFFLINE=1) serves from the cache.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farworker.catalog import is_gated
from farworker.config import ConfigError, WorkerConfig
from farworker.disk_space import disk_problems, format_size, read_cache_disk
from farworker.tiny_model import ensure_tiny_checkpoint

# huggingface_hub (and requests) are imported by the functions that ask the hub: `check` and the tiny model's
# start import this module and never ask it.

log = logging.getLogger(__name__)

# What a server needs: config, weights (safetensors preferred), tokenizer for clients on the same host.
WANTED = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
FALLBACK_WEIGHTS = ("*.bin", "pytorch_model.bin.index.json")
PROGRESS_INTERVAL = 1.0  # seconds between on_progress calls while files download
COMPLETE_DIR = "farworker-complete"  # <cache>/farworker-complete/<repo folder>.json: fully downloaded snapshots

ProgressCallback = Callable[[int, int], None]


class DownloadInterrupted(Exception):
    """A stop was requested while files downloaded; partial blobs stay and resume at the next start."""


class HubUnreachable(Exception):
    """The hub could not be asked (no connection, timeout, 5xx, HF_HUB_OFFLINE=1)."""


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    blob: str | None  # the cache's blob name: the LFS sha256 or the git blob id; None if the hub didn't say


@dataclass(frozen=True)
class DownloadPlan:
    repo: str
    commit: str
    files: tuple[HubFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


_active_plans: dict[str, DownloadPlan] = {}  # repo -> plan being downloaded, for downloaded_bytes()


def resolve_model(
    config: WorkerConfig, on_progress: ProgressCallback | None = None, *, stop: threading.Event | None = None
) -> str:
    """A local directory petals can load: the tiny model, the allowed local dir or the downloaded snapshot."""
    if config.is_tiny_model:
        return str(ensure_tiny_checkpoint(config.cache_dir))
    if config.is_local_model:
        return str(Path(config.model_name).resolve())
    return str(download_hub_model(config, on_progress, stop=stop))


def download_hub_model(
    config: WorkerConfig, on_progress: ProgressCallback | None = None, *, stop: threading.Event | None = None
) -> Path:
    """Download config.model_name into config.cache_dir (checks first) and return its snapshot directory.

    Raises ConfigError for what the operator must fix (token, disk budget, unknown model) before any file
    is written, RuntimeError for a transient failure (the service restarts and resumes), and
    DownloadInterrupted when `stop` is set meanwhile.
    """
    repo, token = config.model_name, config.hf_token or None
    try:
        plan = plan_download(repo, token)
    except HubUnreachable as error:
        cached = complete_snapshot(config.cache_dir, repo)
        if cached is not None:
            log.warning("The hub is unreachable (%s); serving %s from the cache at %s", error, repo, cached)
            if on_progress:
                size = _snapshot_size(cached)
                on_progress(size, size)
            return cached
        if _hub_offline():
            raise ConfigError(
                [
                    f"HF_HUB_OFFLINE=1 but FARLABS_CACHE_DIR={str(config.cache_dir)!r} holds no complete "
                    f"copy of {repo}: expected HF_HUB_OFFLINE unset (download once) or a filled cache"
                ]
            ) from None
        raise RuntimeError(
            f"cannot reach the Hugging Face hub at {_endpoint()} for {repo} and the cache has no complete copy: {error}"
        ) from None
    check_disk(config, plan)
    return fetch(config, plan, token, on_progress, stop)


def plan_download(repo: str, token: str | None) -> DownloadPlan:
    """Ask the hub what downloading `repo` means: commit, files and sizes. Writes nothing."""
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.file_download import OfflineModeIsEnabled  # HF_HUB_OFFLINE=1
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if _hub_offline():  # huggingface_hub 0.17 only honours it for file downloads, not for model_info
        raise HubUnreachable("HF_HUB_OFFLINE=1")
    gated_by_name = is_gated(repo)
    try:
        # token=False: the service's credential is HF_TOKEN, never a login file lying in a home directory
        info = HfApi().model_info(repo, files_metadata=True, token=token or False)
    except GatedRepoError:
        raise ConfigError([_token_refused(repo) if token else _token_required(repo)]) from None
    except RepositoryNotFoundError:
        # The hub answers 401 without a token for gated/private repos as for missing ones.
        if token is None and gated_by_name:
            raise ConfigError([_token_required(repo)]) from None
        extra = " (or HF_TOKEN has no access to it)" if token else ""
        raise ConfigError(
            [
                f"FARLABS_MODEL_NAME={repo!r} was not found on the hub at {_endpoint()}{extra}: "
                "expected a model id such as meta-llama/Llama-2-7b-chat-hf"
            ]
        ) from None
    except (requests.ConnectionError, requests.Timeout, OfflineModeIsEnabled) as error:
        raise HubUnreachable(_short(error)) from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code >= 500:
            raise HubUnreachable(_short(error)) from None
        raise RuntimeError(f"the hub refused the model info of {repo}: {_short(error)}") from None
    if (getattr(info, "gated", False) or gated_by_name) and token is None:
        raise ConfigError([_token_required(repo)])
    if not info.sha:
        raise RuntimeError(f"the hub at {_endpoint()} gave no commit for {repo}")

    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = select_files({name: s.size or 0 for name, s in siblings.items()})
    if not chosen:
        raise ConfigError(
            [
                f"FARLABS_MODEL_NAME={repo!r} has no weights on the hub (no *.safetensors or *.bin): "
                "expected a transformers checkpoint"
            ]
        )
    files = []
    for name in chosen:
        sibling = siblings[name]
        lfs = sibling.lfs if isinstance(sibling.lfs, dict) else {}
        files.append(HubFile(name, sibling.size or lfs.get("size") or 0, lfs.get("sha256") or sibling.blob_id))
    # Sizes the model info left out, and the token's access to the files (the info is public for gated
    # repos; the files are not), both from a HEAD that downloads nothing.
    files = [
        _with_metadata(repo, info.sha, f, token, check_access=(i == 0)) if (i == 0 or not f.size) else f
        for i, f in enumerate(files)
    ]
    return DownloadPlan(repo, info.sha, tuple(files))


def _with_metadata(repo: str, commit: str, file: HubFile, token: str | None, check_access: bool) -> HubFile:
    import requests
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, file.name, revision=commit), token=token or False)
    except (GatedRepoError, RepositoryNotFoundError):
        raise ConfigError([_token_refused(repo) if token else _token_required(repo)]) from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise HubUnreachable(_short(error)) from None
    except HfHubHTTPError as error:
        if check_access and error.response is not None and error.response.status_code in (401, 403):
            raise ConfigError([_token_refused(repo) if token else _token_required(repo)]) from None
        raise RuntimeError(f"the hub refused {file.name} of {repo}: {_short(error)}") from None
    return HubFile(file.name, file.size or meta.size or 0, file.blob or meta.etag)


def check_disk(config: WorkerConfig, plan: DownloadPlan) -> None:
    """ConfigError if the download cannot fit the budget or the disk (disk_space's rule, which `check` applies
    too); looks only, creates nothing."""
    repo_dir = repo_cache_dir(config.cache_dir, plan.repo)
    disk = read_cache_disk(config.cache_dir, repo_dir, config.max_disk_space)
    problems = disk_problems(config.cache_dir, plan.repo, plan.total, _plan_bytes_on_disk(repo_dir, plan),
                             config.max_disk_space, disk)
    if problems:
        raise ConfigError(problems)


def fetch(
    config: WorkerConfig,
    plan: DownloadPlan,
    token: str | None,
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Download the plan's files (resuming partial ones) and return the snapshot directory.

    The download runs in a helper thread so that `stop` (SIGTERM) interrupts it within
    PROGRESS_INTERVAL: DownloadInterrupted is raised and the partial blob stays for the next start.
    """
    import requests
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo_dir = repo_cache_dir(config.cache_dir, plan.repo)
    failures: list[BaseException] = []

    def download_all():
        try:
            for file in plan.files:
                if stop is not None and stop.is_set():
                    return
                hf_hub_download(
                    plan.repo,
                    file.name,
                    revision=plan.commit,
                    cache_dir=str(config.cache_dir),
                    token=token or False,
                    resume_download=True,
                )
        except BaseException as error:  # handed to the waiting thread below
            failures.append(error)

    log.info(
        "Downloading %s (%d files, %s) at commit %s into %s",
        plan.repo,
        len(plan.files),
        format_size(plan.total),
        plan.commit[:12],
        config.cache_dir,
    )
    _active_plans[plan.repo] = plan
    try:
        worker = threading.Thread(target=download_all, name="hub-download", daemon=True)
        worker.start()
        while True:
            if on_progress is not None:
                on_progress(_plan_bytes_on_disk(repo_dir, plan), plan.total)
            worker.join(PROGRESS_INTERVAL)
            if not worker.is_alive():
                break
            if stop is not None and stop.is_set():
                raise DownloadInterrupted(f"download of {plan.repo} interrupted; it resumes at the next start")
    finally:
        _active_plans.pop(plan.repo, None)
    if failures:
        error = failures[0]
        if isinstance(error, (GatedRepoError, RepositoryNotFoundError)):
            raise ConfigError([_token_refused(plan.repo) if token else _token_required(plan.repo)]) from None
        if isinstance(error, (HfHubHTTPError, requests.RequestException, OSError)):
            raise RuntimeError(
                f"downloading {plan.repo} failed: {_short(error)}; what was downloaded is kept and "
                "the download resumes at the next start"
            ) from None
        raise error
    if stop is not None and stop.is_set():
        raise DownloadInterrupted(f"download of {plan.repo} interrupted; it resumes at the next start")
    snapshot = repo_dir / "snapshots" / plan.commit
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(plan.commit)  # what petals/transformers look up by repo id
    _write_complete_marker(config.cache_dir, plan)
    if on_progress is not None:
        on_progress(plan.total, plan.total)
    log.info("Downloaded %s: %s in %s", plan.repo, format_size(plan.total), snapshot)
    return snapshot


def select_files(files: dict[str, int]) -> list[str]:
    def matching(patterns):
        return sorted(name for name in files if any(fnmatch.fnmatch(name, p) for p in patterns))

    chosen = matching(WANTED)
    if not any(name.endswith(".safetensors") for name in chosen):
        chosen += matching(FALLBACK_WEIGHTS)
    if not any(name.endswith((".safetensors", ".bin")) for name in chosen):
        return []
    return chosen


# -- the cache on disk -----------------------------------------------------------------------------
def repo_cache_dir(cache_dir: Path, repo: str) -> Path:
    return Path(cache_dir) / ("models--" + repo.replace("/", "--"))


def downloaded_bytes(cache_dir: Path, repo: str) -> int:
    """Bytes of the repo on disk: during a download, the wanted files' finished and partial blobs."""
    repo_dir = repo_cache_dir(cache_dir, repo)
    plan = _active_plans.get(repo)
    if plan is not None:
        return _plan_bytes_on_disk(repo_dir, plan)
    blobs = repo_dir / "blobs"
    if not blobs.is_dir():
        return 0
    return sum(entry.stat().st_size for entry in blobs.iterdir() if entry.is_file())


def _plan_bytes_on_disk(repo_dir: Path, plan: DownloadPlan) -> int:
    done = 0
    blobs = repo_dir / "blobs"
    snapshot = repo_dir / "snapshots" / plan.commit
    for file in plan.files:
        if (snapshot / file.name).exists():
            done += file.size
            continue
        for candidate in (blobs / file.blob, blobs / f"{file.blob}.incomplete") if file.blob else ():
            try:
                done += min(candidate.stat().st_size, file.size)
                break
            except OSError:
                continue
    return done


def complete_snapshot(cache_dir: Path, repo: str) -> Path | None:
    """The snapshot a previous run downloaded completely (every file present, sizes right), or None."""
    marker = Path(cache_dir) / COMPLETE_DIR / f"{repo_cache_dir(cache_dir, repo).name}.json"
    try:
        record = json.loads(marker.read_text())
        snapshot = repo_cache_dir(cache_dir, repo) / "snapshots" / record["commit"]
        if all(
            (snapshot / name).is_file() and (snapshot / name).stat().st_size == size
            for name, size in record["files"].items()
        ):
            return snapshot
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_complete_marker(cache_dir: Path, plan: DownloadPlan) -> None:
    marker = Path(cache_dir) / COMPLETE_DIR / f"{repo_cache_dir(cache_dir, plan.repo).name}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps(
            {"repo": plan.repo, "commit": plan.commit, "files": {f.name: f.size for f in plan.files}},
            indent=1,
        )
    )
    tmp.replace(marker)


def _snapshot_size(snapshot: Path) -> int:
    return sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())


# -- words -----------------------------------------------------------------------------------------
def format_progress(done: int, total: int) -> str:
    """'downloading weights: 1.20 of 13.48 GB (9%)' with a unit that suits the total."""
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if total >= s), ("B", 1))
    percent = f" ({100 * done // total}%)" if total else ""
    return f"downloading weights: {done / scale:.2f} of {total / scale:.2f} {unit}{percent}"


def _token_required(repo: str) -> str:
    return (
        f"HF_TOKEN is required for the gated model {repo}: expected a Hugging Face access token of an account"
        f" that accepted the model's license at {_endpoint()}/{repo}"
    )


def _token_refused(repo: str) -> str:
    return (
        f"HF_TOKEN was refused for the gated model {repo}: expected a token of an account that accepted the "
        f"model's license at {_endpoint()}/{repo}"
    )


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
