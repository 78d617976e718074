"""import(export(m)) == m at TP = 2: a TP = 1 export imported into a 2-rank tensor-parallel model
(training.init_from's loader) and exported again gives the identical safetensors tensors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megabd3.hf.export import export_state_dict
from tests.dist._launch import launch
from tests.unit._hf_common import random_model

WORKER = Path(__file__).with_name("_hf_roundtrip_worker.py")


def test_export_import_round_trip_tp2(tmp_path) -> None:  # noqa: ANN001
    safetensors = pytest.importorskip("safetensors.torch")
    _, sd, cfg = random_model("bd3lm", 4)
    first = export_state_dict(sd, cfg, tmp_path / "tp1", clip=(0.25, 0.75))
    launch(WORKER, 2, str(first), str(tmp_path / "tp2"))
    a = safetensors.load_file(str(first / "model.safetensors"))
    b = safetensors.load_file(str(tmp_path / "tp2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
