"""Loading: base composition, overrides, strict keys and types, all problems at once, save/hash."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megabd3.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_hash,
    config_to_dict,
    deep_merge,
    load_config,
    parse_override_value,
    save_resolved,
)
from megabd3.errors import UserError


def write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def load(path: Path, *overrides: str, **kw: object) -> Config:
    kw.setdefault("cuda", False)
    return load_config(path, list(overrides), **kw)  # type: ignore[arg-type]


def problems_of(path: Path, *overrides: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, *overrides, **kw)
    return info.value.problems


def test_deep_merge_later_wins_dicts_merge_lists_replace() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3], "z": 2}, "c": {"k": 1}}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3], "z": 2}, "b": 1, "c": {"k": 1}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_base_chain_relative_paths_and_order(tmp_path: Path) -> None:
    # root.json -> [sub/a.json, b.json]; sub/a.json -> [../common.json]. Paths are relative to
    # the including file; later bases win over earlier ones, the file itself wins over its bases.
    write(tmp_path / "common.json", {"model": {"hidden_size": 64, "num_heads": 4, "num_layers": 2},
                                     "training": {"steps": 7, "seed": 3}})
    write(tmp_path / "sub" / "a.json", {"base": ["../common.json"], "model": {"num_layers": 6},
                                        "training": {"steps": 11}, "optim": {"betas": [0.8, 0.9]}})
    write(tmp_path / "b.json", {"training": {"steps": 13}, "optim": {"betas": [0.5, 0.6]}})
    root = write(tmp_path / "root.json", {"base": ["sub/a.json", "b.json"], "training": {"seed": 5}})
    cfg = load(root)
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (64, 4, 6)
    assert cfg.training.steps == 13  # b.json comes after sub/a.json
    assert cfg.training.seed == 5  # the file itself beats its bases
    assert cfg.optim.betas == [0.5, 0.6]  # lists are replaced, not merged
    assert cfg.optim.lr == Config().optim.lr  # untouched keys keep the schema default


def test_base_as_string_and_cwd_independence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "d" / "m.json", {"model": {"hidden_size": 128}})
    root = write(tmp_path / "d" / "r.json", {"base": "m.json"})
    monkeypatch.chdir(tmp_path)
    assert load(Path("d/r.json")).model.hidden_size == 128


def test_overrides_are_typed_and_later_wins(tmp_path: Path) -> None:
    root = write(tmp_path / "r.json", {"training": {"steps": 3}})
    cfg = load(root, "training.steps=20", "optim.lr=1e-3", "model.tie_embeddings=false", "data.tokenizer=gpt2",
               "optim.betas=[0.9, 0.95]", "training.steps=21", "eval.zero_shot_prefixes=[\"a\",\"b\"]",
               "deepspeed.zero_optimization.overlap_comm=true", "deepspeed.comms_logger={\"enabled\": false}",
               "diffusion.noise={\"type\": \"gaussian\", \"mu\": 0.6}", "training.run_dir=\"quoted dir\"")
    assert cfg.training.steps == 21 and isinstance(cfg.training.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is False
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.eval.zero_shot_prefixes == ["a", "b"]
    assert cfg.deepspeed == {"zero_optimization": {"overlap_comm": True}, "comms_logger": {"enabled": False}}
    assert (cfg.diffusion.noise.type, cfg.diffusion.noise.mu) == ("gaussian", 0.6)
    assert cfg.diffusion.noise.sigma == 0.1  # a section override merges, it does not reset siblings
    assert cfg.training.run_dir == "quoted dir"


@pytest.mark.parametrize("hint,text,expected", [
    (int, "12", 12), (float, "3", 3.0), (float, "2.5e-4", 2.5e-4), (bool, "TRUE", True), (bool, "0", False),
    (str, "gpt2", "gpt2"), (list, "[1, 2]", [1, 2]), (dict, '{"a": 1}', {"a": 1}),
])
def test_parse_override_value(hint: type, text: str, expected: object) -> None:
    value = parse_override_value(hint, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("hint,text", [(int, "1.5"), (int, "x"), (float, "fast"), (bool, "maybe"), (list, "1")])
def test_parse_override_value_rejects(hint: type, text: str) -> None:
    with pytest.raises(ValueError):
        parse_override_value(hint, text)


def test_unknown_keys_get_suggestions(tmp_path: Path) -> None:
    root = write(tmp_path / "r.json", {"model": {"hiden_size": 8}, "block_size": 4, "optim": {"lr": 1e-4}})
    probs = problems_of(root, "diffusion.blok_size=3", "trainig.steps=3")
    text = "\n".join(probs)
    assert "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?" in text
    assert "unknown key 'block_size'; did you mean 'diffusion.block_size'?" in text
    assert "did you mean 'diffusion.block_size'?" in [p for p in probs if "blok_size" in p][0]
    assert "did you mean 'training'?" in [p for p in probs if "trainig" in p][0]
    assert len(probs) == 4
    # each problem names where it came from
    assert sum(p.startswith("r.json: ") or "/r.json: " in p for p in probs) == 2
    assert sum(p.startswith("--set: ") for p in probs) == 2


def test_wrong_types_are_reported_with_file_and_key(tmp_path: Path) -> None:
    write(tmp_path / "base.json", {"training": {"steps": "100"}})
    root = write(tmp_path / "r.json", {"base": ["base.json"], "model": {"dropout": True, "hidden_size": 64.0},
                                       "diffusion": 5, "optim": {"betas": "0.9"}})
    probs = problems_of(root)
    assert any("base.json: training.steps: expected int, found \"100\"" in p for p in probs)
    assert any("r.json: model.dropout: expected float, found true" in p for p in probs)
    assert any("r.json: model.hidden_size: expected int, found 64.0" in p for p in probs)
    assert any("r.json: diffusion: expected an object (section), found 5" in p for p in probs)
    assert any("r.json: optim.betas: expected list" in p for p in probs)
    assert len(probs) == 5


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "r.json", {"optim": {"grad_clip": 2}}))
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)


def test_file_level_problems(tmp_path: Path) -> None:
    write(tmp_path / "broken.json", '{"model": {"hidden_size": 64,}}')
    write(tmp_path / "loop_a.json", {"base": ["loop_b.json"]})
    write(tmp_path / "loop_b.json", {"base": ["loop_a.json"]})
    write(tmp_path / "dup.json", '{"training": {"steps": 1, "steps": 2}}')
    root = write(tmp_path / "r.json", {"base": ["broken.json", "missing.json", "loop_a.json", "dup.json"]})
    probs = problems_of(root)
    text = "\n".join(probs)
    assert "broken.json: invalid JSON at line 1" in text
    assert "base 'missing.json' not found" in text
    assert "includes itself" in text
    assert "key 'steps' appears twice" in text
    assert len(probs) == 4


def test_diamond_bases_are_fine_and_report_once(tmp_path: Path) -> None:
    write(tmp_path / "common.json", {"model": {"num_heads": 4, "colour": 1}})
    write(tmp_path / "a.json", {"base": ["common.json"]})
    write(tmp_path / "b.json", {"base": ["common.json"], "model": {"hidden_size": 64}})
    root = write(tmp_path / "r.json", {"base": ["a.json", "b.json"]})
    (prob,) = problems_of(root)
    assert "common.json: unknown key 'model.colour'" in prob
    (tmp_path / "common.json").write_text(json.dumps({"model": {"num_heads": 4}}))
    cfg = load(root)
    assert (cfg.model.num_heads, cfg.model.hidden_size) == (4, 64)


def test_missing_file_and_non_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load(write(tmp_path / "list.json", [1, 2]))


def test_config_error_is_a_user_error_with_all_lines(tmp_path: Path) -> None:
    root = write(tmp_path / "r.json", {"x": 1, "y": 2})
    with pytest.raises(UserError) as info:
        load(root)
    err = info.value
    assert isinstance(err, ConfigError) and len(err.problems) == 2
    lines = str(err).splitlines()
    assert lines[0].startswith("2 problems in config") and lines[1:] == [f"  - {p}" for p in err.problems]


def test_cross_field_problem_names_the_files_that_set_the_keys(tmp_path: Path) -> None:
    write(tmp_path / "par.json", {"parallel": {"pipeline_parallel": 2}})
    root = write(tmp_path / "r.json", {"base": ["par.json"], "parallel": {"zero_stage": 2}})
    (prob,) = problems_of(root)
    assert prob.startswith("par.json, r.json: ") or ("par.json" in prob.split(": ")[0] and "r.json" in prob.split(": ")[0])
    assert "supports only parallel.zero_stage=1" in prob
    # the same problem introduced by --set names --set
    (prob,) = problems_of(write(tmp_path / "ok.json", {}), "parallel.pipeline_parallel=2", "parallel.zero_stage=3")
    assert prob.startswith("--set: ")


def test_validation_can_be_skipped(tmp_path: Path) -> None:
    root = write(tmp_path / "r.json", {"parallel": {"pipeline_parallel": 2, "zero_stage": 3}})
    cfg = load(root, validate=False)
    assert cfg.parallel.zero_stage == 3


def test_save_resolved_round_trip_and_atomic(tmp_path: Path) -> None:
    root = write(tmp_path / "r.json", {"model": {"hidden_size": 96, "num_heads": 4}})
    cfg = load(root, "training.steps=9")
    out = save_resolved(cfg, tmp_path / "run" / "nested")
    assert out == tmp_path / "run" / "nested" / "config.json"
    assert json.loads(out.read_text()) == config_to_dict(cfg)
    assert load(out) == cfg  # the resolved file is itself a loadable config
    assert sorted(os.listdir(out.parent)) == ["config.json"]  # no temp file left behind
    save_resolved(Config(), out.parent)  # overwrite in place
    assert load(out) == Config()


def test_config_hash_is_stable_and_sensitive() -> None:
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 16
    b.training.steps += 1
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, ignore=["training.steps"]) == config_hash(b, ignore=["training.steps"])
    c = Config()
    c.deepspeed = {"b": 1, "a": 2}
    d = Config()
    d.deepspeed = {"a": 2, "b": 1}
    assert config_hash(c) == config_hash(d)  # key order does not matter


def test_config_from_dict(tmp_path: Path) -> None:
    cfg = config_from_dict({"model": {"hidden_size": 64, "num_heads": 2}}, cuda=False)
    assert cfg.model.hidden_size == 64
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"width": 3}}, source="ckpt/config.json", cuda=False)
    assert info.value.problems[0].startswith("ckpt/config.json: unknown key 'model.width'")
