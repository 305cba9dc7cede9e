"""The CLI refuses nonsense with one line on stderr and exit status 2, before starting anything."""

import pytest

from edge_llm.cli import main

REFUSED = [
    (["cluster", "--model", "m", "--workers", "0"], "--workers: 0 is out of range"),
    (["cluster", "--model", "m", "--workers", "-1"], "--workers: -1 is out of range"),
    (["cluster", "--model", "m", "--workers", "two"], "'two' is not an integer"),
    (["cluster", "--model", "m", "--max-running", "0"], "--max-running: 0 is out of range"),
    (["cluster", "--model", "m", "--max-queue", "-1"], "--max-queue: -1 is out of range"),
    (["cluster", "--model", "m", "--step-timeout", "0"], "--step-timeout: 0 is out of range"),
    (["worker", "--poll-us", "-1"], "--poll-us: -1 is out of range"),
    (["serve", "--config", "c.toml", "--poll-us", "x"], "--poll-us"),
    (["cluster", "--model", "m", "--request-timeout", "-5"], "--request-timeout: -5 is out of range"),
    (["cluster", "--model", "m", "--port", "99999"], "--port: 99999 is out of range"),
    (["cluster", "--model", "m", "--port", "-1"], "--port: -1 is out of range"),
    (["cluster", "--model", "m", "--max-batch", "0"], "--max-batch: 0 is out of range"),
    (["cluster", "--model", "m", "--edge-kv-fraction", "1.5"], "--edge-kv-fraction: 1.5 is out of range"),
    (["cluster", "--model", "m", "--link-latency-ms", "-3"], "--link-latency-ms: -3 is out of range"),
    (["cluster", "--model", "m", "--memory-budget-mb", "0"], "--memory-budget-mb: 0 is out of range"),
    (["cluster", "--model", "m", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["generate", "--model", "m", "--temperature", "-1", "hi"], "--temperature: -1 is out of range"),
    (["generate", "--model", "m", "--temperature", "nan", "hi"], "'nan' is not a finite number"),
    (["generate", "--model", "m", "--top-p", "0", "hi"], "--top-p: 0 is out of range"),
    (["generate", "--model", "m", "--top-k", "-2", "hi"], "--top-k: -2 is out of range"),
    (["generate", "--model", "m", "--max-tokens", "0", "hi"], "--max-tokens: 0 is out of range"),
    (["generate", "--model", "m", "--workers", "0", "hi"], "--workers: 0 is out of range"),
    (["split", "m", "--workers", "0"], "--workers: 0 is out of range"),
    (["worker", "--master", "h:1", "--rank", "0"], "--rank: 0 is out of range"),
    (["worker", "--master", "h:1", "--threads", "-1"], "--threads: -1 is out of range"),
    (["worker", "--master", "host:abc", "--rank", "1"], "is not HOST:PORT"),
    (["worker", "--master", "host:70000", "--rank", "1"], "is not HOST:PORT"),
    (["worker", "--master", ":29500", "--rank", "1"], "is not HOST:PORT"),
    # said at once, not after the master is reached (an unreachable one is retried for good)
    (["worker", "--master", "127.0.0.1:1", "--rank", "1", "--model", "no-such-model"], "config.json is missing"),
]


@pytest.mark.parametrize(("argv", "says"), REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_nonsense_is_refused_in_one_line(capsys, argv, says):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("edge-llm") and says in err[0], err


def test_make_model_refuses_a_folder_with_files_and_an_unwritable_place(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["make-model", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"  # nothing overwritten
    (tmp_path / "file").write_text("x")
    assert main(["make-model", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not an empty folder" in err[0] and "cannot write the model" in err[1], err
    assert main(["make-model", str(tmp_path / "fresh")]) == 0  # an empty or new folder is fine


def _commands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _commands(sub))


def test_every_command_says_its_purpose_and_every_flag_its_meaning_and_default(capsys):
    import argparse

    from edge_llm.cli import build_parser

    commands = dict(_commands(build_parser()))
    assert {"make-model", "import", "generate", "split", "cluster", "serve", "worker"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as done:
        main(["cluster", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "emulate an N-device cluster" in text
    assert "N devices: rank 0 + N-1 worker processes (default: 2)" in text
    assert "sequences generating at once (a request counts one per choice it generates) (default: 16)" in text
