"""The `farworker` command line. Commands stay thin: parse, call one function, map errors to exit codes."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from farworker import __version__
from farworker.config import EX_CONFIG, SETTINGS, ConfigError, load_config
from farworker.coordinator.extra import require_extra

# Each command imports the modules it runs inside its own function: `--help`, `status` and `check --config-only`
# must start in a fraction of a second (no torch, petals or FastAPI), and every petals process that `run` forks
# carries whatever this module imported (benchmarks/RESULTS.md measures it). `run` also must set the thread policy
# and pin its GPU before anything imports torch.

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def config_options(command):
    """One flag per setting (`--wallet-address` for FARLABS_WALLET_ADDRESS, ...); a flag wins over the env."""
    for setting in reversed(SETTINGS):
        command = click.option(setting.flag, setting.name, default=None, metavar="VALUE",
                               help=f"{setting.help} [env {setting.env}]")(command)
    return command


def _overrides(kwargs: dict) -> dict:
    """The config flags given on the command line (None = not given, the environment decides)."""
    return {s.name: kwargs.pop(s.name, None) for s in SETTINGS}


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def exits_78_on_config_error(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as error:
            for problem in error.problems:
                click.echo(f"config error: {problem}", err=True)
            sys.exit(EX_CONFIG)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="farworker")
def main():
    """Far Labs GPU mesh worker: serve Petals model blocks, report work to the coordinator, earn $FAR."""
    if click.get_current_context().invoked_subcommand in PROCESS_TREE_COMMANDS:
        from farworker.shm_cleanup import tracker

        tracker()  # notes the pids this command's processes have: their /dev/shm files go at its exit


# Commands whose processes (theirs, or petals' and hivemind's under them) share tensors through /dev/shm.
PROCESS_TREE_COMMANDS = {"run", "demo", "bootstrap", "generate", "coordinator"}


@main.command()
@config_options
@exits_78_on_config_error
def run(**kwargs):
    """Run the worker service: host Petals blocks, speak sd_notify, send signed heartbeats and usage.

    Exit status 78 on bad configuration (systemd's unit does not retry it).
    """
    from farworker.threading_policy import apply_requested_policy, apply_thread_policy

    apply_requested_policy(kwargs.get("thread_policy"))  # before torch loads: libgomp reads it once
    config = load_config(overrides=_overrides(kwargs))  # ConfigError: one line per problem, exit 78
    from farworker.instances import pin_gpu

    pin_gpu(config)  # FARLABS_GPU: before torch initialises CUDA; an unknown GPU is a ConfigError too
    apply_thread_policy(config.thread_policy)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _setup_logging()
    from farworker.runner import run_worker

    # Everything is stopped and flushed (usage outbox committed, status written) when it returns
    _leave_now(run_worker(config))


def _leave_now(code: int) -> None:
    """Exit at once after a command ended its children and flushed its records: the interpreter's own exit would
    wait for threads and queues petals and hivemind never close, and collect hivemind's P2P objects on a thread
    without an event loop (three "Exception ignored in P2P.__del__" tracebacks after the demo's last line).
    The /dev/shm files of the tree go first, as the exit handler would have removed them."""
    from farworker.shm_cleanup import tracker

    tracker().finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.option("--config-only", is_flag=True, help="Only validate the configuration (used before restarts).")
@config_options
def check(config_only, **kwargs):
    """Preflight: GPU, driver, VRAM, disk, /dev/shm, peers, API and configuration, one line each."""
    from farworker.preflight import run_preflight

    sys.exit(run_preflight(_overrides(kwargs), config_only=config_only))


@main.command()
@click.option("--state-dir", envvar="FARLABS_STATE_DIR", type=click.Path(file_okay=False), default=None,
              help="State directory of the running worker [env FARLABS_STATE_DIR].")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@click.option("--instance", type=click.IntRange(0, 63), default=None,
              help="On a multi-GPU host: show instance N (farworker@N) in full.")
def status(state_dir, as_json, instance):
    """Show the running worker: state, blocks, peers, sessions, last heartbeat, outbox, GPUs.

    On a multi-GPU host (one worker per GPU): one line per instance, plus totals.
    """
    from farworker.status_view import show_status

    sys.exit(show_status(state_dir, as_json, instance))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list (what the Ansible role reads).")
def gpus(as_json):
    """List the GPUs NVML sees, one worker each on a multi-GPU host: index, UUID, /dev/nvidiaN, name, memory."""
    import json

    from farworker.instances import gpu_inventory

    listed = gpu_inventory()
    if as_json:
        click.echo(json.dumps(listed))
    for gpu in [] if as_json else listed:
        click.echo(f"{gpu['index']}  {gpu['uuid']}  /dev/nvidia{gpu['minor_number']}  {gpu['name']}  "
                   f"{gpu['memory_total_bytes'] / 2**30:.1f} GiB")
    if not listed and not as_json:
        click.echo("no NVIDIA GPU visible through NVML")


@main.command()
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Tokens to generate through the mesh.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 4),
              help="Worker servers splitting the tiny model's blocks.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the demo keeps its state (default: a fresh temporary directory).")
def demo(max_tokens, workers, work_dir):
    """Run a private mesh here: coordinator, workers on the tiny model, a routed request, the ledger."""
    require_extra()
    _setup_logging("WARNING")
    from farworker.demo import run_demo

    _leave_now(run_demo(max_tokens=max_tokens, workers=workers, work_dir=work_dir))  # its mesh ended, files removed


@main.command()
@click.option("--host-maddrs", envvar="FARLABS_HOST_MADDRS", default="/ip4/0.0.0.0/tcp/31337", show_default=True,
              help="Listen multiaddrs, comma separated [env FARLABS_HOST_MADDRS].")
@click.option("--announce-maddrs", envvar="FARLABS_ANNOUNCE_MADDRS", default="",
              help="Multiaddrs announced to peers, comma separated [env FARLABS_ANNOUNCE_MADDRS].")
@click.option("--identity", envvar="FARLABS_BOOTSTRAP_IDENTITY", type=click.Path(dir_okay=False), default=None,
              help="Persistent identity key (created if missing), so the multiaddr is stable "
                   "[env FARLABS_BOOTSTRAP_IDENTITY; default STATE_DIR/bootstrap-identity.key].")
@click.option("--state-dir", envvar="FARLABS_STATE_DIR", type=click.Path(file_okay=False), default=None,
              help="Where bootstrap-maddrs.txt is written [env FARLABS_STATE_DIR].")
@click.option("--initial-peers", envvar="FARLABS_DHT_BOOTSTRAP", default="",
              help="Other bootstrap peers to join, comma separated [env FARLABS_DHT_BOOTSTRAP].")
@exits_78_on_config_error
def bootstrap(host_maddrs, announce_maddrs, identity, state_dir, initial_peers):
    """Run a DHT bootstrap peer for a private mesh (Type=notify service)."""
    _setup_logging()
    from farworker.bootstrap_peer import run_bootstrap_peer

    sys.exit(run_bootstrap_peer(host_maddrs, announce_maddrs, identity, state_dir, initial_peers))


@main.command()
@click.option("--coordinator", "coordinator_url", required=True, metavar="URL",
              help="Coordinator the signed receipts go to (POST /v1/receipts).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False),
              help="This client's Ed25519 key (PEM), created if missing; its public half must be in the "
                   "coordinator's --client-keys file (see `farworker client-key`).")
@click.option("--initial-peers", envvar="FARLABS_DHT_BOOTSTRAP", required=True,
              help="Mesh DHT multiaddrs, comma separated [env FARLABS_DHT_BOOTSTRAP].")
@click.option("--model-path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local copy of the model's config, tokenizer and embeddings (the client's part).")
@click.option("--model-name", default=None, help="Model name the workers serve [default: model dir name].")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 10),
              help="0: greedy.")
@click.argument("prompt")
def generate(coordinator_url, key_file, initial_peers, model_path, model_name, max_tokens, temperature, prompt):
    """Generate through the mesh directly and vouch for the workers that served it with signed receipts.

    Prints the completion; exit 78 on a bad key or option, 69 when the mesh cannot serve, 75 when the receipts
    could not be delivered (the completion is printed anyway).
    """
    from farworker.threading_policy import apply_requested_policy

    apply_requested_policy(None)  # before torch loads: OpenMP must not spin on cores the mesh needs
    _setup_logging("WARNING")
    from farworker.direct_generation import run_generate

    sys.exit(run_generate(coordinator_url, key_file, initial_peers, model_path, model_name, max_tokens,
                          temperature, prompt))


@main.command("client-key")
@click.argument("key_file", type=click.Path(dir_okay=False))
@click.option("--name", default="client", show_default=True, help="Name for the coordinator's allowlist line.")
def client_key(key_file, name):
    """Print the 'NAME PUBLIC_KEY' line for a coordinator's --client-keys file (the key is created if missing)."""
    from farworker.receipts import ClientKeyError, load_or_create

    try:
        click.echo(f"{name} {load_or_create(key_file).public_key_b64}")
    except ClientKeyError as err:
        click.echo(f"client key error: {err}", err=True)
        sys.exit(EX_CONFIG)


@main.command("render-unit")
@click.option("--output-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where farworker.service and farworker.env.example are written.")
@click.option("--venv-dir", default=sys.prefix, show_default=True, help="The venv farworker is installed in.")
@click.option("--user", default="farworker", show_default=True, help="Service user.")
def render_unit(output_dir, venv_dir, user):
    """Render the systemd unit and env file from the same templates the Ansible role uses."""
    from farworker.unit_render import render_files

    for path in render_files(output_dir, venv_dir=venv_dir, user=user):
        click.echo(f"wrote {path}")


def _add_coordinator_command() -> None:
    from farworker.coordinator.command import coordinator_command

    main.add_command(coordinator_command, "coordinator")


_add_coordinator_command()
