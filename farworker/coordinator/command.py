"""`farworker coordinator`: run the reference coordinator (private meshes, demos, tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from farworker import entry_lines
from farworker.config import EX_CONFIG
from farworker.coordinator.extra import require_extra
from farworker.coordinator.settings import (
    DEFAULT_MAX_UNPROVEN,
    DEFAULT_REGISTRATION_RATE,
    DEFAULT_SETTLE_AFTER_S,
    DEFAULT_UNPROVEN_TTL_S,
    Settings,
    display_target,
    is_database_url,
)

EX_TEMPFAIL = 75  # sysexits: a temporary failure (the database down); systemd's Restart=on-failure retries


@click.group("coordinator", invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--db",
    "db_path",
    envvar="FARLABS_COORDINATOR_DB",
    default="coordinator.sqlite",
    show_default=True,
    metavar="PATH|URL",
    help="The ledger: a SQLite file (the embedded default), or a postgresql://USER:PASSWORD@HOST:PORT/DB URL "
    "(the production store, which several coordinators may share) [env FARLABS_COORDINATOR_DB].",
)
@click.option(
    "--heartbeat-interval",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.05, 3600),
    help="Seconds between heartbeats the coordinator asks workers for.",
)
@click.option(
    "--model-path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Local checkpoint of the mesh's model; enables POST /v1/completions.",
)
@click.option(
    "--model-name", default=None, help="Model name workers register with [default: model dir name]."
)
@click.option(
    "--initial-peer",
    "initial_peers",
    multiple=True,
    envvar="FARLABS_DHT_BOOTSTRAP",
    help="Mesh DHT multiaddr for the completions client (repeatable) [env FARLABS_DHT_BOOTSTRAP].",
)
@click.option("--dht-prefix", default=None, help="DHT prefix of the model [default: from the model name].")
@click.option(
    "--far-per-token",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="$FAR per token for a worker serving the whole model at full reliability.",
)
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1024))
@click.option(
    "--api-keys",
    "api_keys_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of API keys, one 'NAME KEY' per line: the inference API then needs Authorization: Bearer KEY, "
    "and counts usage per NAME (GET /v1/usage). Without it the API is open.",
)
@click.option(
    "--client-keys",
    "client_keys_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of direct clients' keys, one 'NAME PUBLIC_KEY' per line (base64 Ed25519, as `farworker client-key` "
    "prints it): their signed receipts (POST /v1/receipts) vouch for direct traffic, which is then paid.",
)
@click.option(
    "--pay-unvouched-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of claims nobody attested or vouched for (direct traffic without receipts) that is paid anyway.",
)
@click.option(
    "--settle-after",
    default=DEFAULT_SETTLE_AFTER_S,
    show_default=True,
    type=click.FloatRange(0, 10 * 365 * 86400),
    help="Seconds a worker's earnings stay pending before they settle; a failed probe or audit quarantines the "
    "worker and forfeits what is still pending. 0: earnings settle at once.",
)
@click.option(
    "--probe-period",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0, 86400),
    help="Seconds between spot checks of each online worker (needs --model-path); 0 turns them off.",
)
@click.option(
    "--sample-routed",
    default=None,
    type=click.FloatRange(0, 1),
    help="Share of routed completions whose first step on one worker the coordinator recomputes and compares "
    "(a failure quarantines) [default: 0.05, or 0 with --probe-period 0].",
)
@click.option(
    "--audit-share",
    default=None,
    type=click.FloatRange(0, 1),
    help="Share of server sessions the coordinator audits at every position after the request (a failure "
    "quarantines); a worker's first 20 sessions and a worker near its tolerance at 0.5 "
    "[default: 0.05, or 0 with --probe-period 0].",
)
@click.option(
    "--hide-wallets",
    is_flag=True,
    default=False,
    help="The mesh page (GET /) shows wallet addresses shortened, not in full (the JSON API is unchanged).",
)
@click.option(
    "--registration-rate",
    default=DEFAULT_REGISTRATION_RATE,
    show_default=True,
    help="Registrations per source address (an IPv6 source: its /64), as COUNT/PERIOD (5/second, 30/minute, "
    "500/hour); the excess answers 429 with Retry-After. 'none': no limit. Behind a reverse proxy every "
    "registration comes from the proxy.",
)
@click.option(
    "--registration-allowlist",
    "allowlist_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of who may register, one wallet address, peer id or public key (base64) per line; others get "
    "403. A wallet entry admits anyone naming that wallet (its earnings go there). Without it anyone may register.",
)
@click.option(
    "--max-unproven-workers",
    default=DEFAULT_MAX_UNPROVEN,
    show_default=True,
    type=click.IntRange(1),
    help="New workers held at once that have not proven themselves (no attested work, no passed probe); beyond "
    "it new registrations answer 503 with Retry-After.",
)
@click.option(
    "--unproven-ttl",
    default=DEFAULT_UNPROVEN_TTL_S,
    show_default=True,
    type=click.FloatRange(1, 30 * 86400),
    help="Seconds after its registration an unproven worker stops holding a place among --max-unproven-workers.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.pass_context
def coordinator_command(
    ctx,
    host,
    port,
    db_path,
    heartbeat_interval,
    model_path,
    model_name,
    initial_peers,
    dht_prefix,
    far_per_token,
    max_body_bytes,
    api_keys_file,
    client_keys_file,
    pay_unvouched_rate,
    settle_after,
    probe_period,
    sample_routed,
    audit_share,
    hide_wallets,
    registration_rate,
    allowlist_file,
    max_unproven_workers,
    unproven_ttl,
    log_level,
):
    """Run the reference Far Labs coordinator: worker registry, signed heartbeats and usage, the earnings
    ledger, and completions routed through the mesh."""
    if ctx.invoked_subcommand is not None:
        return  # `farworker coordinator copy-ledger ...`: the subcommand runs instead of the coordinator
    require_extra()  # before anything imports FastAPI: a worker host installs without it
    import sqlalchemy

    from farworker.coordinator.service import serve  # here: `farworker run` registers this command, without FastAPI

    if model_path is not None and not initial_peers:
        click.echo(
            "--model-path needs at least one --initial-peer (the mesh to route completions through)", err=True
        )
        sys.exit(EX_CONFIG)
    peers = tuple(p for raw in initial_peers for p in raw.replace(",", " ").split())
    extra = {"far_per_token": far_per_token} if far_per_token is not None else {}
    if api_keys_file is not None:
        try:
            extra["api_keys"] = read_api_keys(api_keys_file)
        except ValueError as err:
            click.echo(f"--api-keys {api_keys_file}: {err}", err=True)
            sys.exit(EX_CONFIG)
    if client_keys_file is not None:
        from farworker.receipts import ClientKeyError, read_client_keys

        try:
            extra["client_keys"] = read_client_keys(client_keys_file)
        except ClientKeyError as err:
            click.echo(f"--client-keys {client_keys_file}: {err}", err=True)
            sys.exit(EX_CONFIG)
    from farworker.coordinator.services.registration import check_rate

    try:
        rate = None if registration_rate.strip().lower() in ("", "none") else check_rate(registration_rate)
    except ValueError as err:
        click.echo(f"--registration-rate: {err}", err=True)
        sys.exit(EX_CONFIG)
    if allowlist_file is not None:
        try:
            extra["registration_allowlist"] = read_allowlist(allowlist_file)
        except ValueError as err:
            click.echo(f"--registration-allowlist {allowlist_file}: {err}", err=True)
            sys.exit(EX_CONFIG)
    try:
        settings = Settings(
            db_path=db_path,
            heartbeat_interval_s=heartbeat_interval,
            model_path=model_path,
            model_name=model_name,
            initial_peers=peers,
            dht_prefix=dht_prefix,
            max_body_bytes=max_body_bytes,
            probe_period_s=probe_period,
            sample_routed=sample_routed,
            audit_share=audit_share,
            pay_unvouched_rate=pay_unvouched_rate,
            settle_after_s=settle_after,
            hide_wallets=hide_wallets,
            registration_rate=rate,
            max_unproven_workers=max_unproven_workers,
            unproven_ttl_s=unproven_ttl,
            **extra,
        )
        serve(settings, host, port, log_level)
    except OSError as err:
        click.echo(f"cannot serve on {host}:{port} with database {display_target(db_path)}: {err.strerror or err}",
                   err=True)
        sys.exit(EX_CONFIG)
    except ValueError as err:  # a --db URL the store cannot serve
        click.echo(str(err), err=True)
        sys.exit(EX_CONFIG)
    except sqlalchemy.exc.SQLAlchemyError as err:  # the database refused or could not be reached: worth a retry
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        click.echo(f"cannot open the ledger {display_target(db_path)}: {first}", err=True)
        sys.exit(EX_TEMPFAIL)


@coordinator_command.command("copy-ledger")
@click.option("--from", "source", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The SQLite ledger to copy (the coordinator using it should be stopped).")
@click.option("--to", "target", required=True, metavar="URL",
              help="postgresql:// URL of an empty database (its schema is made first).")
@click.option("--verify-only", is_flag=True, help="Copy nothing: compare the totals of a ledger already copied.")
def copy_ledger_command(source, target, verify_only):
    """Copy a SQLite ledger into Postgres, then check both hold the same totals: rows per table, tokens and $FAR,
    and every worker's ledger figures. Prints them; exit 0 when all match, 1 on a mismatch, 78 on bad input."""
    require_extra()
    import sqlalchemy

    from farworker.coordinator.services.ledger_copy import copy_ledger

    if not is_database_url(target) or not target.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        click.echo(f"--to must be a postgresql:// URL, got {target!r}", err=True)
        sys.exit(EX_CONFIG)
    try:
        matched, lines = copy_ledger(source, target, verify_only=verify_only)
    except ValueError as err:
        click.echo(str(err), err=True)
        sys.exit(EX_CONFIG)
    except sqlalchemy.exc.SQLAlchemyError as err:
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        click.echo(f"copy-ledger to {display_target(target)}: {first}", err=True)
        sys.exit(1)
    for line in lines:
        click.echo(line)
    sys.exit(0 if matched else 1)



def read_api_keys(path: Path) -> dict[str, str]:
    """'NAME KEY' lines (blank lines and # comments skipped) -> {key: name}; a bad line names its number."""
    keys: dict[str, str] = {}
    for number, fields in entry_lines.entries(path.read_text()):
        if len(fields) != 2 or len(fields[1]) < 16:
            raise ValueError(f"line {number}: expected 'NAME KEY' with a key of at least 16 characters")
        name, key = fields
        if key in keys:
            raise ValueError(f"line {number}: the key of {name!r} is already given to {keys[key]!r}")
        keys[key] = name
    if not keys:
        raise ValueError("no keys in the file")
    return keys


def read_allowlist(path: Path) -> frozenset[str]:
    """One wallet address, peer id or public key per line (blank lines and # comments skipped)."""
    entries = set()
    for number, fields in entry_lines.entries(path.read_text()):
        if len(fields) > 1:
            raise ValueError(f"line {number}: expected one wallet address, peer id or public key")
        entries.update(fields)
    if not entries:
        raise ValueError("no entries in the file (without --registration-allowlist anyone may register)")
    return frozenset(entries)
