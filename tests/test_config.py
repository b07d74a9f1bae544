"""The trainer's config: YAML -> pydantic, --set overrides, and errors that name the full field path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from otca_fast.config import (
    CREDIT_DERIVED,
    Config,
    ConfigError,
    apply_overrides,
    credit_section_model,
    load_config,
    parse_config,
)
from otca_fast.credit import CreditConfig
from otca_fast.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny_video.yaml"


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test")
    return str(info.value)


def _knob_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field path of a config model (sections recursed, the credit section included)."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if name == "credit" and model is Config:
            ann = credit_section_model()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _knob_paths(ann, path + ".")
        elif name != "rewards":
            out.append(path)
    return out


def _has_path(data: dict, path: str) -> bool:
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_four_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_video.yaml", "video_480p.yaml", "image_sd35.yaml", "image_flux.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load_and_name_every_knob(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    data = yaml.safe_load(path.read_text())
    missing = [k for k in _knob_paths(Config) if not _has_path(data, k)]
    assert not missing, f"{path.name} does not name these knobs: {missing}"
    for i, reward in enumerate(data["rewards"]):
        assert set(reward) == {"name", "weight", "options"}, f"rewards[{i}] of {path.name}"
    # the credit section converts to the credit engineer's dataclass, derived fields filled in
    cc = cfg.credit_config()
    assert isinstance(cc, CreditConfig)
    assert cc.dynamics == cfg.sample.dynamics and cc.noise_level == cfg.sample.noise_level
    assert cc.num_steps == cfg.sample.num_steps
    assert sum(abs(w) for w in cc.objective_weights) == pytest.approx(1.0)


def test_video_480p_is_wan21_480p_with_three_roles():
    cfg = load_config(ROOT / "configs" / "video_480p.yaml")
    assert (cfg.sample.height, cfg.sample.width, cfg.sample.num_frames) == (480, 832, 33)
    assert cfg.model.family == "wan2.1" and cfg.credit.scheme == "otca"
    from otca_fast.rewards import list_rewards

    roles = {list_rewards()[r.name][0] for r in cfg.rewards}
    assert {"quality", "motion", "alignment"} <= roles


def test_credit_section_mirrors_credit_config_field_for_field():
    section = credit_section_model()
    fields = {f.name: f for f in dataclasses.fields(CreditConfig)}
    assert set(section.model_fields) - {"scheme"} == set(fields) - set(CREDIT_DERIVED)
    for name, f in fields.items():
        if name not in CREDIT_DERIVED:
            assert section.model_fields[name].default == f.default, name
            assert section.model_fields[name].description, f"credit.{name} has no description"


@pytest.mark.parametrize("path", ["run.output_dir", "run.seed", "train.max_steps", "train.checkpoint_every",
                                  "credit.scheme"])
def test_must_exist_keys(path):
    data = _tiny()
    section, key = path.split(".")
    del data[section][key]
    msg = _error(data)
    assert f"  {path}: required key is missing" in msg


def test_rewards_must_exist_and_be_non_empty():
    data = _tiny()
    del data["rewards"]
    assert "  rewards: required key is missing" in _error(data)
    data = _tiny()
    data["rewards"] = []
    assert "rewards: " in _error(data) and "at least one reward" in _error(data)


def test_unknown_keys_are_rejected_with_their_full_path():
    data = _tiny()
    data["train"]["lora"]["rnak"] = 4
    data["credit"]["shceme"] = "otca"
    data["rewards"][1]["wieght"] = 2
    data["extra_section"] = {}
    msg = _error(data)
    for path in ("train.lora.rnak", "credit.shceme", "rewards[1].wieght", "extra_section"):
        assert f"  {path}: unknown key" in msg, msg
    assert "4 problem(s)" in msg


def test_bad_values_name_their_path_and_the_value():
    data = _tiny()
    data["sample"]["group_size"] = 1
    data["optimizer"]["lr"] = -1
    data["credit"]["scheme"] = "otcaa"
    data["rewards"][0]["weight"] = "heavy"
    msg = _error(data)
    assert "  sample.group_size: Input should be greater than or equal to 2 (got 1)" in msg
    assert "  optimizer.lr: " in msg and "(got -1)" in msg
    assert "  credit.scheme: " in msg and "'otcaa'" in msg
    assert "  rewards[0].weight: " in msg and "'heavy'" in msg
    # CreditConfig's own checks come back under credit.<field>
    data = _tiny()
    data["credit"]["window_schedule"] = "sometimes"
    msg = _error(data)
    assert "  credit.window_schedule: expected one of" in msg and "'sometimes'" in msg


@pytest.mark.parametrize("edit, path, words", [
    (lambda d: d["model"].update(family="wan2.1", tiny=True) or d["sample"].update(num_frames=8), "sample.num_frames",
     "4k+1"),
    (lambda d: d["model"].update(family="wan2.2", tiny=True) or d["sample"].update(height=40), "sample.height/width",
     "multiples of 16"),
    (lambda d: d["sample"].update(dynamics="cps", noise_level=1.5), "sample.noise_level", "cps"),
    (lambda d: d["data"].update(eval_prompts=[], eval_prompt_file=None), "data.eval_prompts", "held-out"),
    (lambda d: d["credit"].update(scheme="dance") or d["train"]["timesteps"].update(mode="fraction"),
     "train.timesteps.mode", "chooses its own"),
    (lambda d: d["credit"].update(scheme="window") or d["sample"]["sde"].update(mode="fraction"),
     "sample.sde.mode", "SDE steps"),
    (lambda d: d["train"].update(finetune="full", kl_reference="adapter"), "train.kl_reference", "adapter"),
    (lambda d: d["model"].update(family="sd3", tiny=False), "model", "model.path"),
    (lambda d: d["train"]["timesteps"].update(mode="window", window_start=6, window_size=2),
     "train.timesteps", "trainable SDE steps"),
    (lambda d: [r.update(weight=0.0) for r in d["rewards"]], "rewards", "every weight is 0"),
])
def test_cross_field_errors(edit, path, words):
    data = _tiny()
    edit(data)
    msg = _error(data)
    assert f"  {path}: " in msg and words in msg, msg


def test_set_overrides_parse_yaml_values():
    data = _tiny()
    apply_overrides(data, ["train.max_steps=7", "train.kl_beta=0.01", "model.tiny=false", "model.path=/x/y",
                           "sample.sde.window_range=[1, 3]", "rewards.1.weight=2.5", "eval.num_steps=null",
                           "run.new_key.deep=1"])
    assert data["train"]["max_steps"] == 7 and isinstance(data["train"]["max_steps"], int)
    assert data["train"]["kl_beta"] == 0.01
    assert data["model"]["tiny"] is False and data["model"]["path"] == "/x/y"
    assert data["sample"]["sde"]["window_range"] == [1, 3]
    assert data["rewards"][1]["weight"] == 2.5
    assert data["eval"]["num_steps"] is None
    assert data["run"]["new_key"] == {"deep": 1}  # created, then rejected by validation as unknown
    assert "  run.new_key: unknown key" in _error(data)


@pytest.mark.parametrize("item, words", [
    ("train.max_steps", "expected key.path=value"),
    ("=3", "dotted key"),
    ("train..max_steps=3", "dotted key"),
    ("rewards.5.weight=1", "list of 3"),
    ("rewards.x.weight=1", "list of 3"),
    ("train.max_steps.deeper=1", "is a int"),
    ("train.max_steps=[1", "not valid YAML"),
])
def test_bad_overrides(item, words):
    with pytest.raises(ConfigError) as info:
        apply_overrides(_tiny(), [item])
    assert words in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_resolved_config_round_trips():
    cfg = load_config(TINY, ["train.max_steps=3"])
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.train.max_steps == 3


def test_cli_reports_config_errors_with_paths_and_exit_code_2(capsys):
    rc = main([str(TINY), "--set", "train.max_step=3", "--set", "sample.group_size=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.max_step: unknown key" in err
    assert "sample.group_size: Input should be greater than or equal to 2" in err


def test_cli_defaults_to_the_tiny_config_and_prints_it(capsys):
    rc = main(["--print-config", "--set", "train.max_steps=2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "configs/tiny_video.yaml" in err
    printed = parse_config(yaml.safe_load(out))
    assert printed == load_config(TINY, ["train.max_steps=2"])


def test_cli_usage_error_for_a_missing_file(capsys):
    assert main(["/nonexistent/config.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_docs_config_reference_matches_the_models():
    from otca_fast.config import reference_markdown

    text = (ROOT / "docs" / "trainer.md").read_text()
    begin = "<!-- BEGIN CONFIG REFERENCE (generated by otca_fast.config.reference_markdown) -->"
    section = text[text.index(begin) + len(begin):text.index("<!-- END CONFIG REFERENCE -->")]
    assert section.strip() == reference_markdown().strip(), (
        "docs/trainer.md's config reference is stale: regenerate it from otca_fast.config.reference_markdown()")
    for knob in _knob_paths(Config):
        assert f"`{knob}`" in section, knob
