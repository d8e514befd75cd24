"""The one disk rule: `check` and `run` say the same about the same disk (no process, no hub)."""

from __future__ import annotations

import pytest

from farworker.catalog import MODEL_DISK_BYTES
from farworker.config import ConfigError, load_config
from farworker.disk_space import FREE_SPACE_RESERVE, CacheDisk, disk_problems, read_cache_disk
from farworker.model_source import DownloadPlan, HubFile, check_disk, repo_cache_dir
from farworker.preflight import check_disk as preflight_check_disk

GB = 10**9
LLAMA_7B = "meta-llama/Llama-2-7b-chat-hf"


def config(tmp_path, **env):
    return load_config({"FARLABS_MODEL_NAME": LLAMA_7B, "FARLABS_CACHE_DIR": str(tmp_path / "cache"), **env},
                       required=False)


def test_fits():
    assert disk_problems("/c", "m", need=10 * GB, have=0, budget=None, disk=CacheDisk(free=20 * GB, others=0)) == []


def test_over_the_budget_counts_the_cache_s_other_files():
    disk = CacheDisk(free=10**15, others=5 * GB)
    assert disk_problems("/c", "m", need=10 * GB, have=0, budget=20 * GB, disk=disk) == []
    (problem,) = disk_problems("/c", "m", need=10 * GB, have=0, budget=14 * GB, disk=disk)
    assert problem.startswith("FARLABS_MAX_DISK_SPACE=14.0 GB is too small for m: its files need 10.0 GB and the "
                              "cache already holds 5.0 GB of other files in /c; expected at least 15.0 GB"), problem


def test_free_space_counts_what_is_downloaded_already_and_keeps_a_reserve():
    need, free = 10 * GB, 4 * GB
    assert disk_problems("/c", "m", need, have=need - free + FREE_SPACE_RESERVE, budget=None,
                         disk=CacheDisk(free, 0)) == []
    (problem,) = disk_problems("/c", "m", need, have=need - free + 1, budget=None, disk=CacheDisk(free, 0))
    assert problem.startswith("FARLABS_CACHE_DIR='/c' has 4.0 GB free: expected"), problem


def test_both_problems_at_once():
    problems = disk_problems("/c", "m", 10 * GB, 0, budget=GB, disk=CacheDisk(free=GB, others=0))
    assert [p.split("=")[0] for p in problems] == ["FARLABS_MAX_DISK_SPACE", "FARLABS_CACHE_DIR"]


def test_the_others_are_counted_only_under_a_budget(tmp_path):
    cache = tmp_path / "cache"
    (cache / "other").mkdir(parents=True)
    (cache / "other" / "weights").write_bytes(b"x" * 1000)
    repo_dir = repo_cache_dir(cache, LLAMA_7B)
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / "abc").write_bytes(b"x" * 500)  # this model's own file: not an "other"
    assert read_cache_disk(cache, repo_dir, budget=10**12).others == 1000
    assert read_cache_disk(cache, repo_dir, budget=None).others == 0
    assert read_cache_disk(tmp_path / "not" / "yet", repo_dir, budget=None).free > 0  # a cache dir not made yet


@pytest.mark.parametrize("budget", ["1GB", "0"])
def test_check_and_run_say_the_same_about_the_same_disk(tmp_path, budget):
    """`check` with the catalogue's size of the model and `run` with a hub plan of that size: the same verdict,
    in the same words."""
    cfg = config(tmp_path, FARLABS_MAX_DISK_SPACE=budget)
    plan = DownloadPlan(LLAMA_7B, "c0ffee", (HubFile("model.safetensors", MODEL_DISK_BYTES[LLAMA_7B], "abc"),))
    checked = preflight_check_disk(cfg)
    try:
        check_disk(cfg, plan)
        ran = []
    except ConfigError as error:
        ran = error.problems
    if ran:
        assert checked.level == "FAIL" and checked.detail == "; ".join(ran), (checked, ran)
    else:
        assert checked.level == "OK", checked
    if budget == "1GB":
        assert ran and ran[0].startswith("FARLABS_MAX_DISK_SPACE=1.0 GB is too small"), ran


def test_a_model_the_catalogue_does_not_size_needs_no_disk(tmp_path):
    result = preflight_check_disk(config(tmp_path, FARLABS_MODEL_NAME="farworker-tiny-llama",
                                         FARLABS_MAX_DISK_SPACE="1kB"))
    assert result.level == "OK" and "needs" not in result.detail, result
