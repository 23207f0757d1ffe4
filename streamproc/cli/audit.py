"""``streamproc audit``: verify and read hash-chained audit files.

``verify`` exits 0 with ``OK: N events, head <hash>`` when the chain is intact and 1
with one line per break otherwise, so it can gate a cron job or a CI step.

Truncation (events cut from the end, or the whole file emptied) leaves a valid prefix,
which no chain can detect on its own.  ``audit head`` prints the chain's signed head
(``STREAM@SEQ:HASH:MAC``); keep it somewhere the log's writer cannot change, and pass it
back with ``verify --expect-head``.  The processor also exports it to the audit topic and
to ``<file>.head`` (checked automatically when present).  ``--require-hmac`` refuses a
chain whose events carry no MACs -- the only check that catches someone who strips every
MAC and recomputes the hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamproc.audit import (
    Anchor,
    Head,
    head_file_for,
    iter_events,
    load_hmac_key,
    verify_files,
    write_hmac_key,
)
from streamproc.errors import ConfigError


@click.group("audit")
def audit() -> None:
    """Verify and read the tamper-evident audit log."""


@audit.command("verify")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audit HMAC key (base64, mode 0600): also detects a fully recomputed chain.",
)
@click.option(
    "--expected-head",
    metavar="HASH",
    help="Head hash anchored elsewhere earlier: detects events removed from the end.",
)
@click.option(
    "--anchor",
    "anchor_text",
    metavar="SEQ:HASH",
    help="The chain continues a rotated file whose last event was SEQ:HASH.",
)
@click.option("--stream", help="Require every event to belong to this stream id.")
@click.option(
    "--require-hmac",
    is_flag=True,
    help="Every event must carry a valid MAC (needs --hmac-key-file): refuses a chain whose "
    "MACs were stripped and hashes recomputed.",
)
@click.option(
    "--expect-head",
    "expect_heads",
    metavar="HEAD",
    multiple=True,
    help="A head printed by `streamproc audit head` (or exported to the audit topic) "
    "earlier: the chain must still reach it (detects truncation and emptied files).",
)
def verify_cmd(
    files: tuple[Path, ...],
    hmac_key_file: Path | None,
    expected_head: str | None,
    anchor_text: str | None,
    stream: str | None,
    require_hmac: bool,
    expect_heads: tuple[str, ...],
) -> None:
    """Verify FILE... (rotated files in order, as one chain); exit 1 on any break."""
    if require_hmac and hmac_key_file is None:
        raise click.UsageError("--require-hmac needs --hmac-key-file")
    try:
        key = load_hmac_key(hmac_key_file) if hmac_key_file else None
        anchor = Anchor.parse(anchor_text) if anchor_text else None
        heads = [Head.parse(h) for h in expect_heads]
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    start_file = files[0].with_name(files[0].name + ".start")
    if anchor is None and start_file.is_file():  # a file that continues a rotated one
        try:
            anchor = Head.from_json(start_file.read_bytes().strip()).anchor
        except ValueError:
            click.echo(f"{start_file}: not an exported audit head", err=True)
            raise SystemExit(1) from None
    sidecar = head_file_for(files[-1])
    if sidecar.is_file():  # the writer's own exported head: catches a file cut short
        try:
            heads.append(Head.from_json(sidecar.read_bytes().strip()))
        except ValueError:
            click.echo(f"{sidecar}: not an exported audit head", err=True)
            raise SystemExit(1) from None
    result = verify_files(
        list(files),
        hmac_key=key,
        anchor=anchor,
        expected_head=expected_head,
        stream=stream,
        require_hmac=require_hmac,
        expect_head=heads,
    )
    click.echo(result.report())
    if result.ok and result.macs_present and not result.hmac_checked:
        click.echo(
            "note: events carry HMACs that were not checked (pass --hmac-key-file)", err=True
        )
    if result.ok and result.head_seq is not None:
        click.echo(f"anchor: {result.head_seq}:{result.head}", err=True)
    raise SystemExit(0 if result.ok else 1)


@audit.command("head")
@click.argument(
    "files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Instead of FILEs: print the latest head of every stream exported to the config's "
    "audit.kafka_topic (checked against --hmac-key-file when given).",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audit HMAC key: sign the head (and check every event's MAC first).",
)
@click.option(
    "--anchor",
    "anchor_text",
    metavar="SEQ:HASH",
    help="The chain continues a rotated file whose last event was SEQ:HASH.",
)
def head_cmd(
    files: tuple[Path, ...],
    config_path: str | None,
    hmac_key_file: Path | None,
    anchor_text: str | None,
) -> None:
    """Print the signed head of a verified chain (STREAM@SEQ:HASH:MAC), for --expect-head.

    Store the line where the writer of the log cannot change it (a ticket, a WORM bucket,
    another host).  Refuses (exit 1) when the chain does not verify.  With --config, prints
    the heads the writers exported to the audit topic instead (one line per stream).
    """
    if bool(files) == bool(config_path):
        raise click.UsageError("give FILE... or --config (the audit topic), not both")
    try:
        key = load_hmac_key(hmac_key_file) if hmac_key_file else None
        anchor = Anchor.parse(anchor_text) if anchor_text else None
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if config_path:
        _topic_heads(config_path, key)
        return
    result = verify_files(list(files), hmac_key=key, anchor=anchor)
    if not result.ok or result.head is None or result.head_seq is None:
        click.echo(result.report(), err=True)
        raise SystemExit(1)
    click.echo(str(Head.make(result.stream or "", result.head_seq, result.head, key)))


@audit.command("tail")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-n",
    "--lines",
    "n",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many events to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
def tail_cmd(file: Path, n: int, as_json: bool) -> None:
    """Show the last events of FILE (not a verification: run `audit verify` for that)."""
    events = list(iter_events(file))[-n:]
    for ev in events:
        if ev is None:
            click.echo("<unparsable line>")
        elif as_json:
            click.echo(json.dumps(ev, sort_keys=True))
        else:
            attrs = " ".join(f"{k}={_show(v)}" for k, v in sorted(ev.get("attrs", {}).items()))
            click.echo(
                f"{ev.get('seq'):>6} {ev.get('ts')} {ev.get('type'):<22} {ev.get('actor')} {attrs}".rstrip()
            )


def _show(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    s = str(v)
    return json.dumps(s) if " " in s else s


@audit.command("keygen")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to create the key file (mode 0600; never overwritten).",
)
def keygen_cmd(out: Path) -> None:
    """Create a random audit HMAC key file."""
    try:
        write_hmac_key(out)
    except FileExistsError:
        raise click.ClickException(
            f"{out} already exists; refusing to overwrite a key file"
        ) from None
    click.echo(f"wrote {out}")


def _topic_heads(config_path: str, key: bytes | None) -> None:
    from streamproc.audit import AuditError, read_topic_heads
    from streamproc.config import load_config

    try:
        config = load_config(config_path, check_policy=False)
        if config.audit is None or config.audit.kafka_topic is None:
            raise click.UsageError(f"{config_path} has no audit.kafka_topic")
        heads = read_topic_heads(config.consumer_config(), config.audit.kafka_topic)
    except (AuditError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    bad = [h for h in heads.values() if key is not None and not h.signed_by(key)]
    for stream in sorted(heads):
        click.echo(str(heads[stream]))
    for h in bad:
        click.echo(f"{h.stream}: head not signed by the audit key", err=True)
    raise SystemExit(1 if bad else 0)


@audit.command("rotate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audit HMAC key the file was written with (checked before anything moves).",
)
@click.option(
    "--new-hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The new audit key, when the key is rotated too: signs the continuation head.",
)
def rotate_cmd(file: Path, hmac_key_file: Path | None, new_hmac_key_file: Path | None) -> None:
    """Move FILE aside (stop its writer first); the chain continues in a fresh FILE.

    Writers never restart a chain on their own, so this is how a file is rotated, archived
    or moved to a new audit key on purpose.  Verify both afterwards with
    `streamproc audit verify OLD FILE`.
    """
    from streamproc.audit import AuditError, rotate_file

    try:
        key = load_hmac_key(hmac_key_file) if hmac_key_file else None
        new_key = load_hmac_key(new_hmac_key_file) if new_hmac_key_file else None
        old, head = rotate_file(file, hmac_key=key, new_hmac_key=new_key)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"moved {file} -> {old}; the chain continues at seq {head.seq + 1}")
    click.echo(f"verify both with: streamproc audit verify {old} {file}")
