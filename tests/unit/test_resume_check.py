"""Resuming under a changed model must fail with the differing keys, before DeepSpeed's load (issue 11)."""
from __future__ import annotations

import pytest

from megabd3.config.load import load_config, save_resolved
from megabd3.errors import UserError
from megabd3.training.resume_check import check_resume_compatible, config_differences

DEMO = "configs/demo.json"


@pytest.fixture
def step_dir(tmp_path):
    """A step directory holding the config.json a checkpoint save writes (save_resolved, as run.py does)."""
    cfg = load_config(DEMO, [f"training.run_dir={tmp_path}"], validate=False)
    d = tmp_path / "checkpoints" / "step_00000002"
    save_resolved(cfg, d)
    return d


def _cfg(tmp_path, *sets: str):
    return load_config(DEMO, [f"training.run_dir={tmp_path}", *sets], validate=False)


def test_same_config_and_resumable_changes_pass(step_dir, tmp_path):
    check_resume_compatible(step_dir, _cfg(tmp_path))
    check_resume_compatible(step_dir, _cfg(tmp_path, "training.steps=900", "checkpoint.save_interval=7",
                                           "logging.wandb_mode=disabled", "eval.max_batches=2", "description=renamed"))


def test_changed_width_names_the_keys_and_the_fix(step_dir, tmp_path):
    with pytest.raises(UserError) as info:
        check_resume_compatible(step_dir, _cfg(tmp_path, "model.hidden_size=256", "optim.lr=0.002"))
    msg = str(info.value)
    assert "model.hidden_size 192 -> 256" in msg and "optim.lr 0.001 -> 0.002" in msg
    assert "training.run_dir" in msg and "checkpoint.resume=false" in msg
    assert "\n" not in msg


def test_no_config_file_or_no_checkpoint_is_let_through(tmp_path):
    check_resume_compatible(tmp_path, _cfg(tmp_path, "model.hidden_size=256"))
    check_resume_compatible(None, _cfg(tmp_path))


def test_damaged_config_file_is_a_user_error(step_dir, tmp_path):
    (step_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        check_resume_compatible(step_dir, _cfg(tmp_path))


def test_differences_report_absent_keys_and_respect_sections():
    old = {"model": {"hidden_size": 1}, "checkpoint": {"x": 1}, "training": {"steps": 1, "steps_extra": 1}}
    new = {"model": {"hidden_size": 1, "new_key": True}, "checkpoint": {"x": 2}, "training": {"steps": 2, "steps_extra": 2}}
    diff = config_differences(old, new, ("checkpoint.", "training.steps"))
    assert diff == {"model.new_key": ("<absent>", True), "training.steps_extra": (1, 2)}
