"""The `rexrag-fast` entry point: every registered subcommand imports and defines its arguments."""

from __future__ import annotations

import argparse
import importlib

import pytest

from rexrag_fast import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_modules_define_arguments_and_run(name: str) -> None:
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert callable(module.run)


def test_unknown_command_exits_with_usage(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
