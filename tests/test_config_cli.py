"""Config validation, the CLI's error contract (one line, exit 2), and environment.yml in step."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kdlab
import kdlab.config
from kdlab.cli import main
from kdlab.config import FIELDS, GROUPS, field_choices, field_help, field_info, fields_by_group, format_value

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = kdlab.KDConfig()
    kdlab.save_config(cfg, tmp_path / "c.yaml")
    assert kdlab.load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    kdlab.load_config(path)


def test_yaml_then_overrides_take_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: 8\ntemperature: 2\nalpha_kd: 0.25\n")
    cfg = kdlab.load_config(tmp_path / "c.yaml", {"batch_size": 2})
    assert (cfg.batch_size, cfg.temperature, cfg.alpha_kd) == (2, 2.0, 0.25)
    assert isinstance(cfg.temperature, float)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -1.0}, r"temperature=-1.0 must be a positive number"),
        ({"alpha_kd": 1.5}, r"alpha_kd=1.5 must be in \[0, 1\]"),
        ({"device": "tpu"}, r"device='tpu' is not allowed; choose one of auto, cpu, cuda"),
        ({"teacher_dtype": "fp8"}, r"teacher_dtype='fp8' is not allowed; choose one of auto, float32"),
        ({"student_init": "copy"}, r"student_init='copy' is not allowed; choose one of random, teacher-layers"),
        ({"batch_size": 0}, r"batch_size=0 must be >= 1"),
        ({"kd_divergence": "tvd"}, r"kd_divergence='tvd' is not allowed; choose one of forward_kl, reverse_kl, jsd"),
        ({"jsd_beta": 0.0}, r"jsd_beta=0.0 must be in \(0, 1\)"),
        ({"max_steps": 0}, r"max_steps=0 must be >= 1, or -1"),
        ({"batch_size": "two"}, r"batch_size='two' must be of type int"),
        ({"resume": "maybe"}, r"resume='maybe' must be true or false"),
        ({"alpha_dk": 0.0}, r"unknown config key\(s\) 'alpha_dk'; allowed keys: data, data_dir"),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_ones(values, message):
    with pytest.raises(kdlab.KDLabError, match=message):
        kdlab.load_config(overrides=values)


def test_epochs_without_max_steps_trains_whole_epochs(tmp_path):
    assert kdlab.load_config().max_steps == 40  # the quick default run
    assert kdlab.load_config(overrides={"batch_size": 2, "epochs": 3}).max_steps == -1
    assert kdlab.load_config(overrides={"epochs": 3, "max_steps": 10}).max_steps == 10
    (tmp_path / "c.yaml").write_text("epochs: 2\n")
    assert kdlab.load_config(tmp_path / "c.yaml").max_steps == -1


def test_yaml_problems_are_user_errors(tmp_path):
    with pytest.raises(kdlab.KDLabError, match="does not exist"):
        kdlab.load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(kdlab.KDLabError, match="must hold a mapping"):
        kdlab.load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(kdlab.KDLabError, match="not valid YAML"):
        kdlab.load_config(tmp_path / "bad.yaml")


def test_every_config_field_has_a_cli_flag():
    from kdlab.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in help_text


# --- the help comes from the fields: description, group, allowed values -------------------------


def test_every_field_has_a_one_line_description_and_a_group():
    for name in FIELDS:
        info = field_info(name)
        assert info.help.strip() and "\n" not in info.help, name
        assert info.group in GROUPS, name
        assert info.flag == "--" + name.replace("_", "-")
    groups = fields_by_group()
    assert list(groups) == list(GROUPS) and all(groups.values())  # every section has fields, in order
    assert [n for names in groups.values() for n in names] == list(FIELDS)  # sections do not reorder fields


def test_field_help_for_docs():
    assert field_help("lr_scheduler") == (
        "learning-rate schedule after the warmup (one of cosine, linear, constant; default: cosine)"
    )
    assert field_help("teacher_cache").endswith("(default: '')")
    assert field_help("resume").endswith("(default: false)")
    with pytest.raises(kdlab.KDLabError, match="unknown config key 'lerning_rate'"):
        field_help("lerning_rate")
    import doctest

    assert doctest.testmod(kdlab.config).failed == 0


def _help(monkeypatch, capsys, command="train") -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _help_entries(text: str) -> dict[str, dict[str, str]]:
    """argparse help -> {group title: {first flag: its entry, whitespace collapsed}}."""
    groups: dict[str, dict[str, str]] = {}
    entries = None
    flag = None
    for line in text.splitlines():
        heading = re.fullmatch(r"([a-z][a-z ,-]*):", line)
        if heading:
            entries, flag = groups.setdefault(heading.group(1), {}), None
        elif entries is not None and re.match(r"  -", line):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif entries is not None and flag is not None:
            entries[flag] += " " + line
    return {g: {f: " ".join(e.split()) for f, e in es.items()} for g, es in groups.items()}


def test_train_help_shows_groups_flags_descriptions_values_and_defaults(monkeypatch, capsys):
    text = _help(monkeypatch, capsys)
    assert max(map(len, text.splitlines())) <= 100
    entries = _help_entries(text)
    for group in GROUPS:
        assert group in entries, group
    for name in FIELDS:
        info = field_info(name)
        entry = entries[info.group].get(info.flag)
        assert entry is not None, f"{info.flag} is not in the help's {info.group!r} group"
        assert " ".join(info.help.split()) in entry, name
        assert f"(default: {format_value(info.default)})" in entry, name
        if info.type is bool:
            assert entry.startswith(f"{info.flag}, --no-{info.flag[2:]} "), entry
        if info.choices:
            assert entry.startswith(f"{info.flag} {{{','.join(info.choices)}}} "), entry
    assert "--config FILE" in entries["options"]["--config"]


@pytest.mark.parametrize("command", ["prepare", "eval", "cache-teacher"])
def test_other_config_commands_share_the_flags(monkeypatch, capsys, command):
    entries = _help_entries(_help(monkeypatch, capsys, command))
    for name in FIELDS:
        info = field_info(name)
        assert info.flag in entries[info.group], (command, name)


def test_fields_with_a_fixed_set_of_values_list_them(monkeypatch, capsys):
    from kdlab.loss.curriculum import PRESETS
    from kdlab.loss.divergences import DIVERGENCES
    from kdlab.loss.features import FEATURE_LOSSES
    from kdlab.training.early_stopping import METRICS, MODES

    expected = {
        "student_init": kdlab.config.STUDENT_INITS,
        "kd_divergence": DIVERGENCES,
        "feature_loss": tuple(FEATURE_LOSSES),
        "logit_projection": kdlab.config.LOGIT_PROJECTIONS,
        "curriculum": tuple(PRESETS),
        "generator": kdlab.config.GENERATORS,
        "on_policy_loss": kdlab.config.ON_POLICY_LOSSES,
        "lr_scheduler": kdlab.config.SCHEDULERS,
        "es_monitor": tuple(METRICS),
        "es_mode": MODES,
        "device": kdlab.config.DEVICES,
        "teacher_dtype": kdlab.config.DTYPES,
        "autocast_dtype": kdlab.config.DTYPES,
        "distributed": kdlab.config.ENGINE_KINDS,
        "teacher_cache_kind": kdlab.config.CACHE_KINDS,
        "teacher_cache_dtype": kdlab.config.HIDDEN_DTYPES,
    }
    assert {name: field_choices(name) for name in FIELDS if field_choices(name)} == expected
    entries = _help_entries(_help(monkeypatch, capsys))
    for name, allowed in expected.items():
        entry = entries[field_info(name).group][field_info(name).flag]
        for value in allowed:
            assert value in entry, (name, value)


@pytest.mark.parametrize("name", [n for n in FIELDS if field_choices(n)])
def test_validation_allows_exactly_the_values_the_help_lists(name):
    allowed = field_choices(name)
    for value in allowed:
        assert getattr(kdlab.KDConfig(**{name: value}), name) == value
    with pytest.raises(kdlab.KDLabError) as e:
        kdlab.KDConfig(**{name: "bogus"})
    assert str(e.value) == f"{name}='bogus' is not allowed; choose one of {', '.join(allowed)}"


def test_choices_are_read_when_checked():  # a registry that grows (e.g. a new preset) is allowed at once
    from kdlab.loss.curriculum import PRESETS

    PRESETS["test-only"] = {}
    try:
        assert "test-only" in field_choices("curriculum")
        assert kdlab.KDConfig(curriculum="test-only").curriculum == "test-only"
    finally:
        del PRESETS["test-only"]


def _run_cli(*args):
    """`kdlab ARGS` in this process (seconds faster than a new interpreter); test_cli_unknown_flag runs
    the real `python -m kdlab` entry point once."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def _run_python_m_kdlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "kdlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result, pattern):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_cli_missing_teacher_path(tmp_path):
    _assert_one_line_error(
        _run_cli("train", "--teacher", str(tmp_path / "no-such-teacher")),
        r"^kdlab: error: teacher path '.*no-such-teacher' does not exist",
    )


def test_cli_unknown_config_key(tmp_path):
    (tmp_path / "run.yaml").write_text("batch_size: 2\nlearning_rate: 0.1\n")
    _assert_one_line_error(
        _run_cli("train", "--config", str(tmp_path / "run.yaml")),
        r"^kdlab: error: unknown config key\(s\) 'learning_rate'; allowed keys: ",
    )


def test_cli_negative_temperature():
    _assert_one_line_error(
        _run_cli("train", "--temperature", "-2"), r"^kdlab: error: temperature=-2.0 must be a positive number"
    )


def test_cli_unknown_flag():
    _assert_one_line_error(
        _run_python_m_kdlab("train", "--lerning-rate", "1"),
        r"^kdlab: error: unrecognized arguments: --lerning-rate 1",
    )


def test_cli_empty_corpus(tmp_path, tiny_teacher):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _assert_one_line_error(
        _run_cli(
            "train",
            "--teacher",
            str(tiny_teacher),
            "--student",
            "tiny",
            "--student-init",
            "random",
            "--data",
            str(empty),
            "--data-dir",
            str(tmp_path / "d"),
            "--out-dir",
            str(tmp_path / "run"),
        ),
        r"^kdlab: error: the train split of the corpus is empty",
    )


def test_cli_missing_data_file(tmp_path, tiny_teacher):
    _assert_one_line_error(
        _run_cli(
            "train",
            "--teacher",
            str(tiny_teacher),
            "--data",
            str(tmp_path / "nope.txt"),
            "--data-dir",
            str(tmp_path / "d"),
        ),
        r"^kdlab: error: data file '.*nope.txt' does not exist",
    )


def test_main_returns_2_for_user_errors_in_process(capsys):
    assert main(["train", "--alpha-kd", "2"]) == 2
    assert "alpha_kd=2.0 must be in [0, 1]" in capsys.readouterr().err


def _requirement_names(reqs):
    return {re.split(r"[<>=!~ \[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-"): r.strip() for r in reqs}


def test_environment_yml_matches_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(
        project["dependencies"]
        + project["optional-dependencies"]["dev"]
        + project["optional-dependencies"]["notebooks"]
    )
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = _requirement_names(
        [c.replace("pytorch", "torch") for c in conda if not c.startswith(("python", "pip"))]
        + [p for p in pip if not p.startswith("-e")]
    )
    assert set(listed) == set(wanted), set(listed) ^ set(wanted)
    for name, spec in wanted.items():  # same version bounds, conda's "=" spelling aside
        assert listed[name].replace(" ", "").replace("pytorch", "torch") == spec.replace(" ", ""), name
