"""Every command of ours in a shell block of README.md and docs/*.md parses.

``streamproc ...`` lines are resolved against the real click command tree: each
subcommand must exist and each ``--option`` must be one of that command's options.
``python <script> ...`` lines of the repository's scripts run ``--help`` (after their
positional subcommands) and every option used must appear in that help.  Other tools'
commands (kcat, kubectl, docker, aws, bao) are not ours and are left alone; the kcat
recipes run against a broker in tests/integration/test_kcat_docs.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from streamproc.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
SHELLS = {"sh", "bash", "shell", "console"}


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every simple command in the shell blocks, continuations joined."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group("lang").lower() not in SHELLS:
                continue
            first = text[: m.start()].count("\n") + 2
            joined = re.sub(r"\\\n\s*", " ", m.group("body"))
            for i, line in enumerate(joined.splitlines()):
                line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
                for part in re.split(r"&&|\|\||\||;", line):
                    try:
                        argv = shlex.split(part)
                    except ValueError:
                        continue
                    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                        argv = argv[1:]  # VAR=value prefixes
                    if argv:
                        out.append((f"{page.name}:{first + i}", argv))
    return out


def ours() -> list[tuple[str, list[str]]]:
    return [(w, a) for w, a in commands() if a[0] == "streamproc"]


def scripts() -> list[tuple[str, list[str]]]:
    return [
        (w, a)
        for w, a in commands()
        if a[0] in ("python", "python3") and len(a) > 1 and (ROOT / a[1]).is_file()
    ]


def options_used(args: list[str]) -> list[str]:
    found = []
    for a in args:
        a = a.strip("[]")
        if a.startswith("-") and a not in ("-", "--"):
            found.append(a.split("=", 1)[0])
    return found


def test_the_docs_have_commands_of_ours() -> None:
    subs = {a[1] for _, a in ours() if len(a) > 1}
    assert {"demo", "run", "keys", "reidentify", "audit", "consume"} <= subs, subs
    assert len(scripts()) >= 4


@pytest.mark.parametrize(("where", "argv"), ours(), ids=[w for w, _ in ours()])
def test_streamproc_command_lines_parse(where: str, argv: list[str]) -> None:
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="streamproc")
    rest = argv[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{where}: no command {rest[0]!r} under {ctx.command_path}"
        ctx = click.Context(sub, info_name=rest[0], parent=ctx)
        cmd, rest = sub, rest[1:]
    assert not isinstance(cmd, click.Group) or not rest or rest[0] in ("-h", "--help"), where
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    for opt in options_used(rest):
        assert opt in known, f"{where}: {ctx.command_path} has no option {opt}"


@pytest.mark.parametrize(("where", "argv"), scripts(), ids=[w for w, _ in scripts()])
def test_script_command_lines_parse(where: str, argv: list[str]) -> None:
    positional = []
    for a in argv[2:]:
        if a.startswith("-"):
            break
        positional.append(a)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    res = subprocess.run([sys.executable, argv[1], *positional, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{where}: {res.stderr[-2000:]}"
    for opt in options_used(argv[2 + len(positional):]):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", res.stdout), f"{where}: {opt} not in --help"
