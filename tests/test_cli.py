"""The command line prints user errors as one line, without a traceback, and samples from a checkpoint."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import Tokenizer


def run_cli(*args, tmp_path):
    env = {"INSTRUCTFLOW_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_user_error_is_one_line_without_traceback(tmp_path):
    tokenizer = Tokenizer.train(["some text to learn from"] * 10, vocab_size=300)
    tokenizer.save(tmp_path / "tok.json")
    result = run_cli("sample", "hello", "--checkpoint", str(tmp_path / "nowhere"), "--tokenizer",
                     str(tmp_path / "tok.json"), tmp_path=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} is not a checkpoint: "
                                                  "it needs model.pt and config.json"]


def test_sample_continues_a_prompt(tmp_path):
    tokenizer = Tokenizer.train(["the cat sat on the mat. " * 20], vocab_size=300)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)),
                    tmp_path / "ckpt")
    result = run_cli("sample", "the cat", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer",
                     str(tmp_path / "tok.json"), "--max-new-tokens", "5", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the cat") and len(result.stdout.strip()) > len("the cat")


def test_sample_finds_the_tokenizer_beside_the_checkpoint(tmp_path):
    from flows.cli import sample_files
    from model.errors import InstructflowError

    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    where = re.escape(str(checkpoint))
    with pytest.raises(InstructflowError, match=f"^{where} is not a checkpoint: it needs model.pt and config.json$"):
        sample_files(str(checkpoint), None)
    (checkpoint / "model.pt").touch(), (checkpoint / "config.json").touch()
    with pytest.raises(InstructflowError, match=f"^no tokenizer beside {where}: pass --tokenizer PATH$"):
        sample_files(str(checkpoint), None)
    (tmp_path / "run" / "tokenizer.json").touch()  # the layout import-gpt2 writes: DIR/../tokenizer.json
    assert sample_files(str(checkpoint), None) == (checkpoint, tmp_path / "run" / "tokenizer.json")
    (checkpoint / "tokenizer.json").touch()  # one inside the checkpoint comes first
    assert sample_files(str(checkpoint), None) == (checkpoint, checkpoint / "tokenizer.json")
    assert sample_files(str(checkpoint), "mine.json") == (checkpoint, Path("mine.json"))


def test_sample_of_a_directory_without_a_model_names_it(tmp_path):
    result = run_cli("sample", "hello", "--checkpoint", str(tmp_path), tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} is not a checkpoint: it needs model.pt and "
                                                  "config.json"]


def test_pipeline_with_a_missing_source_fails_with_one_line(tmp_path):
    missing = tmp_path / "no-such-corpus"
    result = run_cli("pipeline", "--source", str(missing), tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing) in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # said once: not again in Prefect's failure lines
    assert sum(str(missing) in line for line in result.stderr.splitlines()) == 1, result.stderr[-2000:]


def test_sample_before_any_training_says_what_to_run(tmp_path):
    result = run_cli("sample", "hello", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no pretrained model yet: run `make demo` or `instructflow pipeline` first")


def test_compare_with_bad_shots_fails_with_one_line_before_any_work(tmp_path):
    result = run_cli("compare", "--shots", "0,few", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --shots: item 2: Input should be a valid integer, unable to parse string as an integer (got 'few'); "
        "give a list of integers (comma-separated, or JSON); the default is 0,1,4"]
    assert not (tmp_path / "state" / "stages").exists()
    result = run_cli("compare", "--seeds", "0,one", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --seeds: not comma-separated integers (got '0,one'); "
                                                  "give e.g. 0,1,2"]


def test_import_gpt2_weights_from_a_local_directory_then_score_options(tmp_path, gpt2_ranks):
    """A user's saved GPT-2 (here a seeded, randomly initialised one) becomes a checkpoint that evaluation reads."""
    import shutil

    import transformers

    from model.checkpoint import load_checkpoint
    from model.fewshot import EvalExample, evaluate_queries

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64))
    hf.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "state" / "cache" / "files"
    cache.mkdir(parents=True)
    shutil.copy(gpt2_ranks, cache / "gpt2.tiktoken")  # the ranks file as the carrier would have placed it
    result = run_cli("import-gpt2", str(tmp_path / "saved"), "--out", str(tmp_path / "gpt2"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    model, _ = load_checkpoint(tmp_path / "gpt2" / "checkpoint")
    tokenizer = Tokenizer.load(tmp_path / "gpt2" / "tokenizer.json")
    hf.eval(), model.eval()
    ids = tokenizer.encode("Review: fine\nSentiment: positive")
    torch.testing.assert_close(model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits, atol=1e-4, rtol=1e-4)
    query = EvalExample("Review: fine\nSentiment:", (" negative", " positive"), 1)
    (record,) = evaluate_queries(model, tokenizer.encode, tokenizer.decode, [], [query], 0)
    assert set(record) >= {"correct_sum", "correct_mean"}
