"""ZeRO-3 on the real BD3 model, 2 gloo ranks, fp32 (one torchrun launch, tests/dist/_zero3_worker.py):

* EMA evaluation == a plain (ZeRO-0) model carrying the EMA weights: the shadow is set to 0.5x and 0x
  the live weights (and, via `EMA.load_full` -- the `carry_ema`/reshard path -- to 0.25x), the forward
  under `ema.applied()` must equal the plain model's, and the live forward must come back bit-exact.
  Persistent parameters (biases, norms: kept gathered between forwards) are present and are the ones
  the old `ds_tensor`-only swap missed. The engine runs ZeRO++ hpZ (`zero_hpz_partition_size` 2):
  forwards gather from `ds_secondary_tensor`, which the swap must drop.
* streaming `model.pt` (one parameter gathered at a time) is byte-identical to the old all-at-once
  gather; the EMA exported from its shadow partitions equals the weights it was set to.
* `deepspeed.zero.Init` leaves every parameter partitioned and gives the unpartitioned build's weights.
* TP x PP: the per-tensor streaming export is byte-identical to the old all_gather_object one.
* bf16 (DeepSpeed's bf16 runs on CPU/gloo): model.pt and the EMA follow the fp32 master weights under
  ZeRO-0 (FP16_UnfusedOptimizer masters), ZeRO-1 (fp32 fragments) and ZeRO-3 (fp32 partitions).
Tolerance: exact (0.0) -- the same fp32 kernels run on the same full tensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch import launch  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = Path(__file__).with_name("_zero3_worker.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_ema")
    launch(WORKER, 2, str(out), timeout=240)
    return json.loads((out / "result.json").read_text())


def test_zero3_ema_forward_equals_plain_model_with_ema_weights(result):
    assert result["persistent"] > 0 and result["released"] > 0  # both kinds of ZeRO-3 parameter present
    assert result["hpz"] is True  # ZeRO++ hpZ secondary partitions exist: the swap must bypass them
    assert result["live"] == 0.0
    for key in ("ema_half", "ema_zero", "ema_quarter"):
        assert result[key] == 0.0, key
    for key in ("restored", "restored2", "restored3", "after_save"):
        assert result[key] == 0.0, key  # the live weights come back bit-exact


def test_streaming_model_export_is_byte_identical(result):
    assert result["model_bytes_equal"] is True
    assert result["model_vs_full"] == 0.0
    assert result["ema_export"] == 0.0


def test_zero_init_gives_the_unpartitioned_weights(result):
    assert result["zero_init_partitioned"] is True
    assert result["zero_init_keys"] is True
    assert result["zero_init"] == 0.0


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_master")
    launch(Path(__file__).with_name("_bf16_master_worker.py"), 2, "0,1,3", str(out), timeout=240)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("zero,kind", [("0", "master"), ("1", "fragment"), ("3", "zero3")])
def test_bf16_ema_and_model_pt_follow_the_fp32_master(bf16, zero, kind):
    """DeepSpeed bf16 on CPU/gloo: after 3 AdamW steps, random fp32 values are written into the optimizer's
    fp32 master directly (not through the export code) and a suppressed step copies them into the bf16
    module. model.pt holds exactly those fp32 values, the EMA (decay 0 on its last update) too, and
    evaluating with an EMA shadow of half those values equals a plain bf16 model carrying them. The
    final norm is frozen: DeepSpeed keeps no master for it, model.pt carries its module weights."""
    r = bf16[zero]
    assert r["dtype"] == "torch.bfloat16" and r["kinds"] == [kind]
    assert r["frozen"] > 0  # a frozen bf16 parameter (no master: exported from the module, not None)
    assert r["bf16_vs_master"] > 1e-4  # the two copies really differ, so the checks below can fail
    assert r["module_vs_bf16_master"] == 0.0  # the values written are the master the optimizer uses
    assert r["model_dtype"] == ["torch.float32"] and r["frozen_dtype"] == ["torch.bfloat16"]
    assert r["model_vs_master"] == 0.0
    # shadow - 1.0 * (shadow - master): exact up to one rounding of the subtraction (fp32 ulp), far below
    # the bf16 rounding (> 1e-4) a shadow of the bf16 copies would show
    assert r["ema_vs_master"] <= 1e-6
    assert r["ema_applied_vs_live"] > 1e-3  # the swap really changed the weights
    assert r["ema_applied_vs_plain"] == 0.0 and r["restored"] == 0.0
    assert r["masters_set"] is True and r["restored_master"] == 0.0  # fine-tune: exact fp32 master from model.pt


def test_streaming_export_tp_pp(tmp_path):
    """TP = 2 x PP = 2 (4 gloo ranks): the per-tensor export to rank 0 (`to_all=False`: the other ranks
    get None, none holds a full CPU copy) and the every-rank variant are byte-identical to the old
    all_gather_object implementation. Then PP = 2 x DP = 2 (see the worker's `dp_replicas`)."""
    launch(Path(__file__).with_name("_export_stream_worker.py"), 4, str(tmp_path), timeout=240)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["keys"] > 0
    assert r["stream_equal"] is True and r["others_none"] is True and r["every_equal"] is True
    # PP = 2 x DP = 2, bf16 module through an fp32 materializer: rank 0 alone keeps the (fp32) dict, and
    # each rank materialises each of its parameters once (no extra dtype-probe round)
    assert r["dp_none"] == [False, True, True, True]
    assert r["dp_calls"] == r["dp_local"] and min(r["dp_calls"]) > 0
    assert r["dp_dtypes"] == ["torch.float32"] and r["dp_fp32_equal"] is True
