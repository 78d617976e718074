"""Bad input to `python launchers/pretrain.py`: a one-line `error:` on stderr, exit status 1, no traceback.

Plus the non-finite-loss policies on the real tiny BD3 model: `stop` names the step and the last good
checkpoint; `skip` really skips the optimizer step (weights, optimizer state and EMA unchanged between
the checkpoints around the skipped step), counts it and logs it. Subprocess tests, a few seconds each.
"""
from __future__ import annotations

import json

import pytest
import torch

from _training_run import make_dataset, ok, pretrain, tiny_config, train_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_cli")
    return root, make_dataset(root / "data")


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])
    return errors[0]


def test_unknown_config_key(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run")
    assert_one_line_error(pretrain(cfg, "training.bogus_key=1"), "training.bogus_key")


def test_unknown_key_in_file(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run", optim={"learning_rate": 1.0})
    assert_one_line_error(pretrain(cfg), "learning_rate")


def test_pipeline_with_zero3(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run")
    assert_one_line_error(pretrain(cfg, "parallel.pipeline_parallel=2", "parallel.zero_stage=3"),
                          "pipeline_parallel=2", "zero_stage=1")


def test_missing_dataset(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run")
    line = assert_one_line_error(pretrain(cfg, f"data.train_prefix={tmp_path}/absent"), "data.train_prefix",
                                 "absent.idx", "preprocess_data.py")
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_tokenizer_mismatch(data, tmp_path):
    root, prefix = data
    bert_prefix = make_dataset(root / "bert", tokenizer="bert-base-uncased", docs=40)
    cfg = tiny_config(tmp_path / "c.json", bert_prefix, tmp_path / "run")  # gpt2 config on a BERT dataset
    line = assert_one_line_error(pretrain(cfg))
    assert "bert" in line.lower() and "gpt2" in line.lower(), line


def test_missing_init_from(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run")
    assert_one_line_error(pretrain(cfg, f"training.init_from={tmp_path}/no_such_run"), "training.init_from",
                          "no_such_run")
    (tmp_path / "empty_run").mkdir()
    assert_one_line_error(pretrain(cfg, f"training.init_from={tmp_path}/empty_run"), "empty_run")


def test_nan_loss_stops_naming_step_and_last_checkpoint(data, tmp_path):
    root, prefix = data
    cfg = tiny_config(tmp_path / "c.json", prefix, tmp_path / "run")
    # test-only fault injection (megabd3.training.engine.FAULT_ENV): the loss of step 2 becomes NaN.
    # (A huge LR does not do it reliably: the adaLN/LayerNorm model keeps the loss finite at lr 1e30.)
    proc = pretrain(cfg, "checkpoint.save_interval=1", "training.steps=4", extra_env={"MEGABD3_TEST_NAN_STEPS": "2"})
    line = assert_one_line_error(proc, "non-finite", "at step 2", "step_00000001", "nan_policy")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_nan_skip_policy_really_skips(data, tmp_path):
    root, prefix = data
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.json", prefix, run)
    proc = ok(pretrain(cfg, "training.nan_policy=skip", "checkpoint.save_interval=1", "training.steps=4",
                       "training.eval_interval=0", extra_env={"MEGABD3_TEST_NAN_STEPS": "2"}))
    assert "optimizer step skipped" in proc.stdout
    recs = {r["step"]: r for r in train_records(run)}
    assert [recs[s]["skipped"] for s in (1, 2, 3, 4)] == [False, True, False, False]
    assert [recs[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    ck = run / "checkpoints"
    m1, m2, m3 = (torch.load(ck / f"step_0000000{s}" / "model.pt", weights_only=False) for s in (1, 2, 3))
    for key in m1["model"]:
        assert torch.equal(m1["model"][key], m2["model"][key]), key  # skipped: no weight update
        assert torch.equal(m1["ema"][key], m2["ema"][key]), key  # ... and no EMA update
    assert any(not torch.equal(m2["model"][k], m3["model"][k]) for k in m2["model"])  # step 3 trains again
    # ZeRO-0 keeps the torch optimizer state inside DeepSpeed's model-states file
    opt1, opt2 = (torch.load(next((ck / f"step_0000000{s}").rglob("mp_rank_00_model_states.pt")), weights_only=False)
                  for s in (1, 2))
    state1, state2 = opt1["optimizer"]["state"], opt2["optimizer"]["state"]
    assert state1 and int(state1[0]["step"]) == 1
    for k in state1:  # AdamW moments and step counts untouched by the skipped step
        for name in state1[k]:
            assert torch.equal(torch.as_tensor(state1[k][name]), torch.as_tensor(state2[k][name])), (k, name)
    state = torch.load(ck / "step_00000004" / "megabd3_state.pt", weights_only=False)
    assert state["skipped_steps"] == 1


def test_resume_after_changing_model_width_names_the_keys(data, tmp_path):
    """The issue-11 bad input: resuming a run directory after changing model.hidden_size died inside
    DeepSpeed's load ("The size of tensor a ... must match"); now a one-line error naming the key, raised
    before the model is built, and the run directory's config.json is left as it was."""
    root, prefix = data
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.json", prefix, run)
    ok(pretrain(cfg, "training.steps=1", "training.eval_interval=0"))
    before = (run / "config.json").read_text()
    width = json.loads(before)["model"]["hidden_size"]
    line = assert_one_line_error(pretrain(cfg, "training.steps=2", f"model.hidden_size={2 * width}"),
                                 f"model.hidden_size {width} -> {2 * width}", "training.run_dir", "checkpoint.resume=false")
    assert "must match" not in line
    assert (run / "config.json").read_text() == before
