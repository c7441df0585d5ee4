"""Config values are typed by their fields, from YAML, flags and Python alike, and a bad one is named
at load time; every RunConfig field is a flag."""

import dataclasses

import pytest

from actors.training.config import LoraTrainConfig
from engine.cli import _run_config, build_parser, main
from engine.config import PromptConfig, RunConfig, load_yaml
from engine.table.config import TableConfig
from serve.app import ServeConfig


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_1e_minus_5_is_a_float(tmp_path):
    cfg = load_yaml(_yaml(tmp_path, "replicas: '3'\nlora:\n  lr: 1e-5\n  target_modules: [q_proj, v_proj]\n"))
    assert cfg.lora.lr == 1e-05 and isinstance(cfg.lora.lr, float)  # YAML 1.1 reads `1e-5` as a string
    assert cfg.replicas == 3 and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert load_yaml(_yaml(tmp_path, "lora: {bf16: no}\n")).lora.bf16 == "no"  # YAML 1.1 reads `no` as false


@pytest.mark.parametrize("text, message", [
    ("replicas: two\n", r"run.yaml: replicas: input should be a valid integer \(got 'two'\)"),
    ("lora: {lr: fast}\n", r"run.yaml: lora.lr: input should be a valid number \(got 'fast'\)"),
    ("prompt: {max_demos: 2}\n", r"run.yaml: prompt: unknown keys \['max_demos'\]; valid keys: \['max_bootstrapped"),
    ("colour: red\n", r"run.yaml: unknown keys \['colour'\]; valid keys: \['adapter', "),
    ("lora: 3\n", r"run.yaml: lora: input should be a dictionary or an instance of LoraTrainConfig \(got 3\)"),
    ("- a\n", "run.yaml: expected a mapping"),
    ("lora: {zero_stage: 4}\n", r"run.yaml: lora: zero_stage must be 0 \(DDP\), 1, 2 or 3, got 4"),
])
def test_a_bad_yaml_value_is_named_at_load_time(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_yaml(_yaml(tmp_path, text))


def test_every_bad_key_gets_its_own_line(tmp_path):
    with pytest.raises(ValueError) as info:
        load_yaml(_yaml(tmp_path, "replicas: two\nthreads: many\nlora: {lr: fast, colour: red}\n"))
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{tmp_path / 'run.yaml'}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"lora", "replicas", "threads", "lora.lr"}


def test_the_python_api_validates_and_replace_validates_again():
    with pytest.raises(ValueError, match=r"^replicas: input should be a valid integer \(got 'two'\)$"):
        RunConfig(replicas="two")
    cfg = RunConfig()
    assert dataclasses.replace(cfg, replicas="3").replicas == 3  # coerced, as from YAML
    with pytest.raises(ValueError, match="replicas: input should be a valid integer"):
        dataclasses.replace(cfg, replicas="three")
    with pytest.raises(ValueError, match="replicas and threads >= 1"):  # __post_init__ checks still run
        dataclasses.replace(cfg, replicas=0)
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        RunConfig(colour="red")
    with pytest.raises(ValueError, match=r"lora.rank: input should be a valid integer"):
        RunConfig(lora={"rank": "big"})


def test_configs_stay_frozen_dataclasses():
    cfg = RunConfig()
    assert [f.name for f in dataclasses.fields(PromptConfig)] == list(vars(cfg.prompt))
    assert dataclasses.fields(LoraTrainConfig)[0].metadata["help"] == "LoRA rank r"
    assert dataclasses.asdict(cfg)["lora"]["target_modules"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cfg == RunConfig() and hash(cfg.lora) == hash(RunConfig().lora) and hash(cfg.prompt)
    assert cfg.program_args is not RunConfig().program_args  # default_factory: a dict each
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.replicas = 3  # type: ignore[misc]
    assert RunConfig(lora={"lr": "1e-4"}).lora == LoraTrainConfig(lr=1e-4)  # a mapping: from the paper's defaults, as YAML
    assert TableConfig(seeds=[3, 4]).seeds == (3, 4)
    with pytest.raises(ValueError, match=r"seeds\[1\]: input should be a valid integer"):
        TableConfig(seeds=[3, "x"])


def test_flags_are_typed_like_yaml(tmp_path):
    parse = build_parser().parse_args
    assert _run_config(parse(["run", "--lora-lr", "1e-5"])).lora.lr == 1e-05
    assert _run_config(parse(["run", "--lora.lr", "1e-5"])).lora.lr == 1e-05
    cfg = _run_config(parse(["run", "--config", str(_yaml(tmp_path, "lora: {epochs: 6}\nprompt: {max_labeled_demos: 1}\n")),
                             "--prompt.max_labeled_demos", "2", "--lora.use_gpu", "--max-tokens", "64",
                             "--engine-kwarg", "dtype=bfloat16", "--no-plan-check"]))
    assert (cfg.lora.epochs, cfg.lora.use_gpu, cfg.prompt.max_labeled_demos, cfg.max_tokens) == (6, True, 2, 64)
    assert cfg.engine_kwargs == {"dtype": "bfloat16"} and cfg.plan_check is False
    with pytest.raises(ValueError, match=r"^replicas: input should be a valid integer \(got 'two'\)$"):
        _run_config(parse(["run", "--replicas", "two"]))


def test_a_bad_flag_value_fails_with_exit_code_1_naming_the_key(caplog):
    assert main(["plan", "--replicas", "two"]) == 1  # before Ray is reached
    assert "tandem plan failed: ValueError: replicas: input should be a valid integer (got 'two')" in caplog.text
    with pytest.raises(SystemExit) as info:  # a value outside a field's choices: argparse's usage error
        build_parser().parse_args(["run", "--lifecycle", "swap"])
    assert info.value.code == 2


def _dests(command: str) -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
    return {a.dest for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", ["run", "plan", "table"])
def test_every_run_config_field_is_a_flag(command):
    dests = _dests(command)
    skipped = {"strategy", "run_dir", "seed"} if command == "table" else set()  # the table sets them per cell
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            missing = {g.name for g in dataclasses.fields(value)} - {d.split("__", 1)[1] for d in dests
                                                                     if d.startswith(f"{f.name}__")}
            assert not missing, f"{f.name}: fields without a flag: {missing}"
        elif f.name not in skipped:  # a mapping's flag is the singular, KEY=VALUE: --program-arg
            assert (f.name.removesuffix("s") if isinstance(value, dict) else f.name) in dests, f.name
    assert not skipped & dests


def test_existing_flag_names_still_parse():
    args = build_parser().parse_args([
        "run", "--max-tokens", "8", "--run-dir", "r", "--lora-lr", "0.1", "--prompt-num-candidate-programs", "2",
        "--no-exclude-demos", "--no-tracking", "--tracking-uri", "sqlite:///x.db", "--w-rounds", "2",
        "--program-arg", "k=v", "--data-arg", "n=3", "--adapter", "chat", "--lifecycle", "hotswap"])
    cfg = _run_config(args)
    assert (cfg.max_tokens, cfg.run_dir, cfg.lora.lr, cfg.prompt.num_candidate_programs) == (8, "r", 0.1, 2)
    assert (cfg.exclude_demos, cfg.tracking, cfg.w_rounds, cfg.adapter, cfg.lifecycle) == (False, False, 2, "chat",
                                                                                            "hotswap")
    assert (cfg.program_args, cfg.data_args, cfg.tracking_uri) == ({"k": "v"}, {"n": 3}, "sqlite:///x.db")


def test_help_shows_each_fields_help_and_default():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
    text = sub.choices["run"].format_help()
    assert "--replicas INT" in text and "vLLM replicas (default 2)" in text
    assert "--lora-lr NUMBER" in text and "AdamW learning rate (default 0.001)" in text


@pytest.mark.parametrize("args, message", [
    ({"run_dir": "r", "port": "eighty"}, r"^serve args: port: input should be a valid integer \(got 'eighty'\)$"),
    ({"run_dir": "r", "colour": "x"}, r"serve args: unknown keys \['colour'\]; valid keys: \['allow_programs', 'app_name'"),
    ({"port": "80"}, "serve args: run_dir: required, not given"),
])
def test_serve_config_names_a_bad_arg(args, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.from_args(args)
    assert ServeConfig.from_args({"run_dir": "r", "lm_cpus": "0.5"}).lm_cpus == 0.5


def test_a_served_app_is_named_after_its_run_unless_named():
    assert ServeConfig(run_dir="runs/iris smollm2").app_name == "tandem-iris-smollm2"  # two runs never replace each other
    assert ServeConfig(run_dir="runs/a", app_name="mine").app_name == "mine"


def test_a_yaml_section_changes_only_the_keys_it_names(tmp_path):
    cfg = load_yaml(_yaml(tmp_path, "lora: {epochs: 4}\nprompt: {max_labeled_demos: 2}\n"))
    default = RunConfig()
    assert cfg.lora == dataclasses.replace(default.lora, epochs=4)  # lr 1e-3, q/k/v/o, batch 4: the run's, not the class's
    assert cfg.prompt == dataclasses.replace(default.prompt, max_labeled_demos=2)
