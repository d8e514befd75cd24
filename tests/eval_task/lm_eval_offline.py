"""lm-evaluation-harness' CLI on this directory's task, offline: no hub download (the data file and exact_match/
are read from here), and datasets 2.14 (the newest that installs beside transformers 4.34's huggingface-hub 0.17)
made to read local files under today's fsspec, whose local filesystem calls itself ("file", "local"), not "file".

From the repository root, a coordinator serving the tiny model at URL (e.g. `farworker demo`):
    .venv/bin/python tests/eval_task/lm_eval_offline.py --model local-completions --tasks farworker_mc \
        --model_args model=farworker-tiny-llama,base_url=URL/v1,tokenizer_backend=huggingface,tokenizer=CHECKPOINT
    .venv/bin/python tests/eval_task/lm_eval_offline.py --model hf --tasks farworker_mc \
        --model_args pretrained=CHECKPOINT,dtype=float32,device=cpu
(OPENAI_API_KEY must be set for local-completions: any value where the coordinator has no API keys.)
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def is_remote_filesystem(fs) -> bool:
    """datasets' own test, knowing that fsspec's local filesystem may have several protocol names."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return fs is not None and "file" not in protocols


def offline_environment() -> dict[str, str]:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


def main() -> None:
    os.environ.update(offline_environment())  # before datasets is imported: it reads them once
    os.chdir(HERE)
    import datasets.builder

    datasets.builder.is_remote_filesystem = is_remote_filesystem
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.tasks import include_path

    include_path(str(HERE))
    cli_evaluate()


if __name__ == "__main__":
    main()
