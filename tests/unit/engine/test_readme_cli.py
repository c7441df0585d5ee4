"""Every `tandem` / `python -m engine` command in the README's code blocks parses with today's CLI,
and the config files it names exist and load: a renamed flag or file breaks this test, not a user."""

import re
import shlex
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.config import load_yaml

ROOT = Path(__file__).resolve().parents[3]
BLOCKS = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _commands() -> list[list[str]]:
    commands = []
    for block in BLOCKS:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            for start in (".venv/bin/tandem ", "-- python -m engine ", "python -m engine "):
                if start in line:
                    commands.append(shlex.split(line.split(start, 1)[1].split("&&")[0]))
                    break
    return commands


COMMANDS = _commands()


def test_the_readme_shows_every_subcommand():
    assert {c[0] for c in COMMANDS} >= {"run", "models", "table", "serve", "plan"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv):
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or value
    config = getattr(args, "config", None)
    if config:
        load_yaml(ROOT / config)  # the config file it names exists and has only known keys
