"""The quiet console (issue 11): known third-party noise is filtered, anything else still shows."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from megabd3 import quiet

TE_MSG = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


def _emitted(message: str, category: type[Warning], module: str) -> list[str]:
    """The warnings that get through after quiet.install(), for one warning attributed to `module`."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn_explicit(message, category, filename="x.py", lineno=1, module=module)
    return [str(w.message) for w in seen]


@pytest.fixture(autouse=True)
def _filters_on(monkeypatch):
    monkeypatch.delenv(quiet.SHOW_ENV, raising=False)


def test_known_noise_is_filtered():
    assert _emitted(TE_MSG, UserWarning, "megatron.core.optimizer") == []
    assert _emitted("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends") == []
    assert _emitted("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
                    "megatron.core.transformer.transformer_config") == []
    assert _emitted("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed."
                    "reduce_scatter_single` instead.", FutureWarning, "torch.distributed.c10d_logger") == []


def test_unknown_warnings_stay_visible():
    # a real warning from the same module, the same text from another package, another category
    assert _emitted("grad norm is NaN", UserWarning, "megatron.core.optimizer") == ["grad norm is NaN"]
    assert _emitted(TE_MSG, UserWarning, "megabd3.model.transformer") == [TE_MSG]
    assert _emitted("`torch.distributed.all_reduce` is deprecated", FutureWarning, "torch.distributed.c10d_logger") \
        == ["`torch.distributed.all_reduce` is deprecated"]


def test_show_env_disables_the_filters(monkeypatch):
    monkeypatch.setenv(quiet.SHOW_ENV, "1")
    assert _emitted(TE_MSG, UserWarning, "megatron.core.optimizer") == [TE_MSG]


def test_deepspeed_accelerator_log_line_is_dropped_other_lines_kept():
    quiet.install()
    quiet.install()  # idempotent: one filter
    logger = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, quiet._DropKnownLogs) for f in logger.filters) == 1
    rec = lambda msg: logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, msg, None, None)  # noqa: E731
    assert not logger.filter(rec("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."))
    assert logger.filter(rec("zero stage 3 partition failed"))


def test_extras_line_says_what_is_missing_and_what_it_costs():
    gpu = quiet.extras_line(cuda=True, missing=["Transformer Engine", "apex"])
    assert "Transformer Engine and apex are not installed" in gpu and "unfused" in gpu
    assert "GPU-only" in quiet.extras_line(cuda=False, missing=["apex"])
    assert quiet.extras_line(cuda=True, missing=[]) is None


def test_megatron_and_deepspeed_imports_are_quiet():
    """End to end in a fresh interpreter: the import-time noise of megatron-core and DeepSpeed is gone."""
    code = ("from megabd3 import quiet; quiet.install(); import deepspeed; import megatron.core.optimizer; "
            "from megatron.core.transformer.transformer_config import TransformerConfig; "
            "import warnings; warnings.warn('a real warning')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "not installed" not in out and "Setting accelerator" not in out, out
    assert "a real warning" in out
