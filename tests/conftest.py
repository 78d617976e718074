"""Test-session setup shared by every test: offline everything, private caches, the slow switch.

Runs before any test module is imported, so libraries read these variables at import time.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Never touch the network: tokenizers and judges come from local files, wandb logs offline.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

# Caches go to a per-session temporary directory unless the caller chose one (so a developer's
# ~/.cache is neither read nor polluted, and parallel sessions do not share sample-index caches).
_SESSION_TMP = tempfile.mkdtemp(prefix="megabd3-tests-")
_OWNER_PID = os.getpid()
for _name, _sub in {
    "HF_HOME": "hf",
    "HF_DATASETS_CACHE": "hf/datasets",
    "MEGABD3_CACHE": "megabd3",
    "WANDB_DIR": "wandb",
    "TRITON_CACHE_DIR": "triton",
}.items():
    if _name not in os.environ:
        os.environ[_name] = os.path.join(_SESSION_TMP, _sub)
        os.makedirs(os.environ[_name], exist_ok=True)


@atexit.register
def _cleanup_session_tmp() -> None:
    # Only the process that created it removes it (worker processes inherit this module).
    if os.getpid() == _OWNER_PID:
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true", default=False,
                     help="skip tests marked slow (same as -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--skip-slow"):
        return
    skip = pytest.mark.skip(reason="--skip-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
