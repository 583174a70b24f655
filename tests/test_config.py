"""Config loading, overrides and validation errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nestlearn.config import ConfigError, available_configs, from_dict, load_config, to_dict
from nestlearn.config.loader import parse_override


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_configs_load_and_validate() -> None:
    names = available_configs()
    assert {"transformer/pilot_smoke", "transformer/pilot", "data/stdlib"} <= set(names)
    for name in ("transformer/pilot_smoke", "transformer/pilot"):
        cfg = load_config(name)
        assert cfg.model.type == "transformer"
        assert cfg.data.sources == ["stdlib"]


def test_short_name_finds_nested_config() -> None:
    assert load_config("stdlib") == load_config("data/stdlib")


def test_ambiguous_short_name_lists_the_candidates() -> None:
    with pytest.raises(ConfigError, match=r"ambiguous: .*transformer/pilot_smoke"):
        load_config("pilot_smoke")


def test_overrides_parse_scalars_and_lists() -> None:
    cfg = load_config(None, ["train.steps=7", "data.sources=[a.txt,b.txt]", "optimizer.lr=1e-4",
                             "data.max_docs=null", "train.precision=bf16"])
    assert cfg.train.steps == 7
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.data.max_docs is None
    assert cfg.train.precision == "bf16"


def test_int_widens_to_float_but_nothing_else_coerces() -> None:
    cfg = load_config(None, ["train.grad_clip=2"])
    assert isinstance(cfg.train.grad_clip, float)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=2.5"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=true"])


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.setps=3"])
    message = str(err.value)
    assert "train.setps" in message and "did you mean 'train.steps'" in message
    assert "override" in message
    assert "\n" not in message


def test_error_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "bad.yaml", "model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config("bad", config_dir=tmp_path)
    assert "bad.yaml" in str(err.value) and "model.d_model" in str(err.value)


def test_out_of_range_names_key_file_and_range(tmp_path: Path) -> None:
    write(tmp_path / "range.yaml", "data:\n  val_fraction: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config("range", config_dir=tmp_path)
    text = str(err.value)
    assert "data.val_fraction" in text and "range.yaml" in text and "(0, 0.5)" in text


def test_literal_choices_are_listed() -> None:
    with pytest.raises(ConfigError, match="one of fp32, bf16"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("name", ["hope/mid", "hope/target"])
def test_every_cms_level_of_the_large_configs_fires_a_few_hundred_times(name: str) -> None:
    """A level on a level clock that fires a handful of times in a run never trains (the
    pilot's 5000 steps and the smoke's 200 are too short for a few hundred at C > 16)."""
    cfg = load_config(name)
    assert cfg.optimizer.type == "chunked"
    firings = {c: cfg.train.steps // c for c in cfg.model.cms.chunk_sizes}
    assert min(firings.values()) >= 200, firings


def test_an_in_context_chunk_longer_than_the_sequence_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.cms\.chunk_sizes.*<= train\.seq_len \(256\)"):
        load_config("hope/pilot_smoke", ["model.cms.in_context=true", "model.cms.chunk_sizes=[8,512]"])
    load_config("hope/pilot_smoke", ["model.cms.in_context=true", "model.cms.chunk_sizes=[8,256]"])


def test_compiled_self_ref_is_refused_with_in_context_cms() -> None:
    with pytest.raises(ConfigError, match=r"model\.self_ref\.compile.*double backward"):
        load_config("hope/pilot_smoke", ["model.self_ref.compile=true", "model.cms.in_context=true",
                                           "model.cms.chunk_sizes=[4,8]"])


def test_defaults_merge_and_child_wins(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "train:\n  steps: 10\n  batch_size: 3\n")
    write(tmp_path / "child.yaml", "defaults: [base]\ntrain:\n  steps: 20\n")
    cfg = load_config("child", ["train.seq_len=64"], config_dir=tmp_path)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len) == (20, 3, 64)


def test_defaults_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "defaults: [b]\n")
    write(tmp_path / "b.yaml", "defaults: [a]\n")
    with pytest.raises(ConfigError, match="without a cycle"):
        load_config("a", config_dir=tmp_path)


def test_unknown_config_name_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        load_config("transformer/pilot_smok")


def test_bad_override_form() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_override("train.steps")


def test_invalid_yaml_is_one_line_error(tmp_path: Path) -> None:
    write(tmp_path / "broken.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config("broken", config_dir=tmp_path)


def test_json_round_trip() -> None:
    cfg = load_config("transformer/pilot_smoke", ["train.steps=3"])
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_cli_reports_bad_key_in_one_line_with_nonzero_exit() -> None:
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "config", "train.stepz=5"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.stepz" in lines[0] and "train.steps" in lines[0]


def test_cli_config_prints_resolved_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "config", "-c",
                           "transformer/pilot_smoke", "train.steps=11"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["train"]["steps"] == 11
