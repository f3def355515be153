"""The command line's stage flags: one per field of every stage a command runs, defaults from the demo, values
checked by the stage models, a config file under the flags; mistakes are one line and exit status 2."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import STAGE_COMMANDS, build_parser, main, parse
from flows.demo import DEMO_JUDGE, DEMO_PPO, DEMO_PRETRAIN, DEMO_REWARD, DEMO_SAMPLE
from tasks.params import (EvaluateParams, FinetuneParams, IngestParams, JudgeParams, PPOParams, PretrainParams,
                          RankParams, RewardParams, SampleParams, TaskParams, TokenizerParams)

# the stage models each command hands to its flow (flows/pipeline.py, flows/compare.py, flows/rlhf.py)
STAGES = {
    "pipeline": {"ingest": IngestParams, "tokenizer": TokenizerParams, "pretrain": PretrainParams},
    "compare": {"ingest": IngestParams, "tokenizer": TokenizerParams, "pretrain": PretrainParams, "task": TaskParams,
                "finetune": FinetuneParams, "evaluate": EvaluateParams},
    "rlhf": {"sample": SampleParams, "rank": RankParams, "reward": RewardParams, "ppo": PPOParams,
             "judge": JudgeParams},
}


def options_of(command: str) -> set[str]:
    parser = build_parser(command, STAGE_COMMANDS[command].defaults())
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {option for action in commands.choices[command]._actions for option in action.option_strings}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_field_of_every_stage_is_a_flag(command):
    assert {stage: type(p) for stage, p in STAGE_COMMANDS[command].defaults().items()} == STAGES[command]
    options = options_of(command)
    for stage, model in STAGES[command].items():
        for name, field in model.model_fields.items():
            assert f"--{stage}.{name}" in options, f"{command} has no --{stage}.{name}"
            if field.annotation is bool:
                assert f"--no-{stage}.{name}" in options
    for alias in STAGE_COMMANDS[command].aliases.values():
        assert set(alias) <= options


def test_demo_takes_only_the_pretraining_length():  # flows.demo.demo's one parameter
    assert {o for o in options_of("demo") if o.startswith("--pretrain.")} == {"--pretrain.max_steps"}
    _, params = parse(["demo", "--max-steps", "5"])
    assert params == {"pretrain": DEMO_PRETRAIN.model_copy(update={"max_steps": 5})}


def test_the_old_short_flags_are_aliases():
    _, params = parse(["pipeline", "--source", "a.txt", "--source", "b.txt,c.txt", "--tokenizer", "gpt2",
                       "--vocab-size", "5000", "--preset", "gpt1", "--max-steps", "7", "--num-workers", "2"])
    assert params == {"ingest": IngestParams(sources=["a.txt", "b.txt", "c.txt"]),
                      "tokenizer": TokenizerParams(kind="gpt2", vocab_size=5000),
                      "pretrain": PretrainParams(preset="gpt1", max_steps=7, num_workers=2)}
    args, params = parse(["compare", "--max-steps", "600", "--seeds", "3,4", "--shots", "0,2", "--task", "quartz",
                          "--train-examples", "100", "--epochs", "1", "--learning-rate", "3e-3", "--max-len", "32",
                          "--eval-examples", "50"])
    assert args.seeds == [3, 4]
    assert params["pretrain"].max_steps == 600 and params["pretrain"].checkpoint_every == 100  # six snapshots
    assert params["task"] == TaskParams(name="quartz")
    assert params["finetune"] == FinetuneParams(max_train_examples=100, epochs=1, learning_rate=3e-3, max_len=32)
    assert params["evaluate"] == EvaluateParams(shots=[0, 2], max_examples=50)
    args, params = parse(["rlhf", "--labeler", "simulated", "--prompts", "8", "--k", "5", "--rounds", "2"])
    assert args.rounds == 2 and (params["sample"].n_prompts, params["sample"].k) == (8, 5)
    assert (params["rank"].labeler, params["rank"].wait) == ("simulated", "collect")


def test_rlhf_defaults_are_the_demos_laptop_scale():
    _, params = parse(["rlhf"])
    assert (params["reward"], params["ppo"], params["judge"]) == (DEMO_REWARD, DEMO_PPO, DEMO_JUDGE)
    assert params["sample"] == DEMO_SAMPLE.model_copy(update={"n_prompts": 64, "k": 4})
    assert (params["rank"].labeler, params["rank"].wait, params["rank"].project) == ("people", "pause",
                                                                                     RankParams().project)
    _, params = parse(["rlhf", "--labeler", "simulated", "--rank.wait", "pause"])  # a wait given is kept
    assert params["rank"].wait == "pause"


def test_rlhf_help_shows_the_laptop_scale_defaults(capsys):
    assert main(["rlhf", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    episodes = re.search(r"--ppo\.total_episodes INT (.*?) --ppo\.", text).group(1)
    assert "prompts answered over the run" in episodes and "[default: 2048]" in episodes
    assert "[default: 0.2]" in re.search(r"--ppo\.beta NUM (.*?) --ppo\.", text).group(1)


def test_flags_and_config_reach_the_rlhf_flow(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("tasks.console.configure_console", lambda verbose: calls.append(("console", verbose)))
    monkeypatch.setattr("flows.rlhf.rlhf", lambda *args, **params: calls.append((args, params)) or {"rounds": []})
    (tmp_path / "c.yaml").write_text("ppo: {beta: 0.1, ptx_coef: 2}\njudge: {n_prompts: 10}\n")
    argv = ["rlhf", "--config", str(tmp_path / "c.yaml"), "--ppo.beta", "0.05", "--sample.top_p", "0.9", "-v",
            "--ptx-tokens", "tokens.json"]
    assert main(argv) == 0
    _, expected = parse(argv)
    assert calls == [("console", True), (("models:/sft/latest", None, 1, False),
                                         {**{f"{stage}_params": p for stage, p in expected.items()},
                                          "ptx_tokens_uri": "tokens.json"})]
    assert (expected["ppo"].beta, expected["ppo"].ptx_coef) == (0.05, 2.0)  # the flag overrides the file
    assert expected["judge"].n_prompts == 10 and expected["sample"].top_p == 0.9


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_round_trips(tmp_path, suffix):
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    config = {"sample": {"k": 6, "top_p": None}, "rank": {"labeler": "simulated"},
              "ppo": {"beta": 0.05, "kl_target": None, "require_useful_reward": False}, "judge": {"judge": "reward"}}
    (tmp_path / f"c{suffix}").write_text(dump(config))
    _, params = parse(["rlhf", "--config", str(tmp_path / f"c{suffix}")])
    assert params == {"sample": DEMO_SAMPLE.model_copy(update={"n_prompts": 64, "k": 6, "top_p": None}),
                      "rank": RankParams(labeler="simulated", wait="collect"),
                      "reward": DEMO_REWARD,
                      "ppo": DEMO_PPO.model_copy(update={"beta": 0.05, "kl_target": None,
                                                         "require_useful_reward": False}),
                      "judge": DEMO_JUDGE.model_copy(update={"judge": "reward"})}
    everything = {stage: p.model_dump(mode="json") for stage, p in params.items()}
    (tmp_path / f"all{suffix}").write_text(dump(everything))
    assert parse(["rlhf", "--config", str(tmp_path / f"all{suffix}")])[1] == params


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_config_mistakes_name_the_key(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in [("ppo: {betta: 0.1}", f"error: {path}: unknown key ppo.betta (did you mean beta?)"),
                          ("ppq: {beta: 0.1}", f"error: {path}: unknown stage 'ppq' (did you mean ppo?)"),
                          ("ppo: {beta: -1}", f"error: ppo.beta in {path}: Input should be greater than 0"),
                          ("ppo: [beta]", f"error: {path}: ppo must map parameter names to values"),
                          ("ppo: {beta: [", f"error: --config: {path} is not valid YAML")]:
        path.write_text(text)
        assert one_error(capsys, ["rlhf", "--config", str(path)]).startswith(message)
    assert one_error(capsys, ["pipeline", "--config", str(tmp_path / "none.yaml")]).startswith(
        f"error: --config: {tmp_path / 'none.yaml'} does not exist")


def test_a_value_out_of_range_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("flows.pipeline.pipeline", lambda *params: pytest.fail("a mistaken command line ran"))
    assert one_error(capsys, ["pipeline", "--max-steps", "-5"]) == (
        "error: --max-steps: Input should be greater than or equal to 1 (got '-5'); give an integer >= 1; "
        "the default is 300")
    assert one_error(capsys, ["rlhf", "--ppo.beta", "-1"]) == (
        "error: --ppo.beta: Input should be greater than 0 (got '-1'); give a number > 0; the default is 0.2")
    assert one_error(capsys, ["rlhf", "--sample.k", "12"]).startswith("error: --sample.k: Input should be less than "
                                                                      "or equal to 9 (got '12'); give an integer >= 2")
    assert one_error(capsys, ["rlhf", "--rank.labeler", "me"]).startswith("error: --rank.labeler: Input should be "
                                                                          "'people' or 'simulated'")
    assert one_error(capsys, ["rlhf", "--rank.round", "../x"]).startswith("error: --rank.round: String should match")
    assert one_error(capsys, ["rlhf", "--rounds", "0"]).startswith("error: --rounds: must be at least 1")
    assert one_error(capsys, ["rlhf", "--ppo.ptx_coef", "27.8"]).startswith(
        "error: --ppo.ptx_coef: PPO-ptx needs the pretraining tokens; pass --ptx-tokens")
    assert one_error(capsys, ["pipeline", "--max-step", "5"]) == (
        "error: unrecognized arguments: --max-step 5; see `instructflow pipeline --help`")


@pytest.mark.parametrize("argv", [["pipeline", "--max-steps", "-5"], ["rlhf", "--ppo.beta", "-1"]])
def test_the_installed_command_prints_no_traceback(tmp_path, argv):
    command = Path(sys.executable).parent / "instructflow"
    result = subprocess.run([str(command), *argv], capture_output=True, text=True, timeout=300,
                            env={"INSTRUCTFLOW_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"error: {argv[1]}: ")


def test_none_and_booleans_and_lists(tmp_path):
    _, params = parse(["pipeline", "--pretrain.use_gpu", "false", "--pretrain.compile", "--tokenizer.parallel_chunks",
                       "none", "--pretrain.learning_rate", "1e-3", "--ingest.sources", '["a,b.txt", "c.txt"]'])
    assert params["pretrain"].use_gpu is False and params["pretrain"].compile is True
    assert params["pretrain"].learning_rate == 1e-3 and params["tokenizer"].parallel_chunks is None
    assert params["ingest"].sources == ["a,b.txt", "c.txt"]  # a JSON list keeps commas inside names
    _, params = parse(["rlhf", "--no-ppo.require_useful_reward", "--reward.labeler", "none", "--ppo.kl_target", "2"])
    assert params["ppo"].require_useful_reward is False and params["ppo"].kl_target == 2.0
    assert params["reward"].labeler is None


def test_verbose_is_passed_to_the_console_before_the_flow(monkeypatch):
    calls = []
    monkeypatch.setattr("tasks.console.configure_console", lambda verbose: calls.append(("console", verbose)))
    monkeypatch.setattr("flows.pipeline.pipeline", lambda *params: calls.append("pipeline") or {})
    assert main(["pipeline"]) == 0 and main(["-v", "pipeline"]) == 0 and main(["pipeline", "--verbose"]) == 0
    assert calls == [("console", False), "pipeline", ("console", True), "pipeline", ("console", True), "pipeline"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"instructflow \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
