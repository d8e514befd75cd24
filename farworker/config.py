"""Worker configuration: the one place FARLABS_* variables and CLI flags are parsed and validated.

Every setting has an environment variable and an equivalent `farworker run` flag; a flag wins over the
environment. Validation reports every problem at once, one line each, naming the variable and what is
accepted, so an operator fixes the env file in one pass (the service then exits 78, EX_CONFIG).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from farworker.catalog import SUPPORTED_MODELS, TINY_MODEL_NAME
from farworker.petals.multiaddr import MultiaddrError, protocol_names

EX_CONFIG = 78

DTYPES = ("float16", "bfloat16", "float32")
QUANT_TYPES = ("auto", "none", "int8", "nf4")
THREAD_POLICIES = ("passive", "single", "spin")


class ConfigError(Exception):
    """Raised with every problem found; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Invalid(ValueError):
    pass


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise _Invalid


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _Invalid from None
        if not low <= value <= high:
            raise _Invalid
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise _Invalid from None
    if not value > 0:
        raise _Invalid
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise _Invalid
        return value

    return parse


def _wallet(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
        raise _Invalid
    return value


# Multiaddr shapes the p2p daemon can dial and `check` can probe: a host, then a TCP port or a QUIC port.
_MADDR_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
_MADDR_TRANSPORTS = (("tcp",), ("udp", "quic"), ("udp", "quic-v1"))
_MADDR_FORM = "/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT (or /udp/PORT/quic)"


def _multiaddr(item: str, require_peer_id: bool) -> str:
    """One multiaddr, parsed as hivemind's DHT will parse it (a /p2p/ peer id must decode), in a shape we serve."""
    try:
        protocols = protocol_names(item)
    except MultiaddrError as error:
        if error.protocol == "p2p":
            raise _Invalid("the /p2p/ peer id does not decode") from None
        raise _Invalid(str(error)) from None
    has_peer = protocols[-1:] == ["p2p"]
    transport = tuple(protocols[1:-1] if has_peer else protocols[1:])
    if not protocols or protocols[0] not in _MADDR_HOSTS or transport not in _MADDR_TRANSPORTS:
        raise _Invalid(f"not {_MADDR_FORM}")
    if require_peer_id and not has_peer:
        raise _Invalid("no /p2p/ peer id")
    return item


def _multiaddrs(raw: str, require_peer_id: bool) -> tuple[str, ...]:
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    for item in items:
        try:
            _multiaddr(item, require_peer_id)
        except _Invalid as error:
            raise _Invalid(f"{item}: {error}" if len(items) > 1 else str(error)) from None
    return items


def _multiaddr_list(raw: str) -> tuple[str, ...]:
    return _multiaddrs(raw, require_peer_id=False)


def _bootstrap_list(raw: str) -> tuple[str, ...]:
    # A bootstrap address must name the peer, or the DHT cannot authenticate it.
    return _multiaddrs(raw, require_peer_id=True)


def _http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _Invalid
    return value


def _http_urls(raw: str) -> str:
    """One coordinator URL, or replicas' URLs separated by commas (the worker fails over in this order)."""
    urls = [_http_url(part) for part in raw.split(",")]  # an empty part is no URL: invalid
    if len(set(urls)) != len(urls):
        raise _Invalid
    return ",".join(urls)


def _num_blocks(raw: str) -> int | None:
    if raw.strip().lower() in ("", "auto"):
        return None
    return _int_range(1, 1000)(raw)


def _block_indices(raw: str) -> tuple[int, int] | None:
    if not raw.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", raw)
    if not match or int(match[1]) >= int(match[2]):
        raise _Invalid
    return int(match[1]), int(match[2])


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(raw: str) -> int | None:
    """'200GB', '1.5TiB', '0' (no limit) -> bytes, or None for no limit."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", raw)
    if not match or match[2].lower() not in _SIZE_UNITS:
        raise _Invalid
    value = int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    return value or None


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _Invalid
    return value


def _text(max_len: int) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if len(value) > max_len or any(ord(c) < 32 for c in value):
            raise _Invalid
        return value

    return parse


# A GPU as nvidia-smi and NVML name it: its index in NVML's (PCI bus) order, or its UUID (MIG devices too).
_GPU_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F-]{8,64}")


def _gpu(raw: str) -> str:
    value = raw.strip()
    if value.lower() in ("", "cpu"):
        return value.lower()
    if value.isdigit() and int(value) < 64:
        return str(int(value))
    if not _GPU_UUID.fullmatch(value):
        raise _Invalid
    return value


def _instance(raw: str) -> int | None:
    if not raw.strip():
        return None
    return _int_range(0, 63)(raw)


def _host_id(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise _Invalid
    return value


def _model(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise _Invalid
    return value


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of WorkerConfig
    env: str
    parse: Callable[[str], object]
    accepted: str  # said in the error line
    default: str | None = None  # raw default, parsed like any input; None = unset
    help: str = ""
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("wallet_address", "FARLABS_WALLET_ADDRESS", _wallet, "0x followed by 40 hex digits",
            help="Wallet that receives $FAR for the work served (required)."),
    Setting("dht_bootstrap", "FARLABS_DHT_BOOTSTRAP", _bootstrap_list,
            f"comma-separated multiaddrs with a peer id, {_MADDR_FORM}/p2p/PEER_ID, "
            "e.g. /ip4/10.0.0.5/tcp/31337/p2p/Qm...",
            help="Initial DHT peers (required unless --new-swarm). Give several: a restarted peer hides blocks."),
    Setting("new_swarm", "FARLABS_NEW_SWARM", _bool, "true or false", "false",
            help="Start a private swarm instead of joining one (private meshes, demo, tests)."),
    Setting("model_name", "FARLABS_MODEL_NAME", _model,
            f"one of {', '.join(SUPPORTED_MODELS)}, {TINY_MODEL_NAME}, or a local checkpoint directory "
            "with --allow-local-model", SUPPORTED_MODELS[0], help="Model whose blocks this worker serves."),
    Setting("allow_local_model", "FARLABS_ALLOW_LOCAL_MODEL", _bool, "true or false", "false",
            help="Allow FARLABS_MODEL_NAME to be a local checkpoint directory."),
    Setting("api_base_url", "FARLABS_API_BASE_URL", _http_urls,
            "an http:// or https:// URL, or several different ones separated by commas",
            help="Far Labs coordinator API (required); several replicas' URLs, comma-separated, to fail over."),
    Setting("num_blocks", "FARLABS_NUM_BLOCKS", _num_blocks, "a whole number from 1 to 1000, or auto", "auto",
            help="Blocks to serve; auto fits free VRAM (see README for the formula)."),
    Setting("block_indices", "FARLABS_BLOCK_INDICES", _block_indices, "start:end with start < end, e.g. 0:16",
            "", help="Serve exactly these blocks instead of choosing."),
    Setting("torch_dtype", "FARLABS_TORCH_DTYPE", _choice(DTYPES), ", ".join(DTYPES), "float16",
            help="Dtype of the served blocks (float16 needs a GPU)."),
    Setting("quant_type", "FARLABS_QUANT_TYPE", _choice(QUANT_TYPES), ", ".join(QUANT_TYPES), "auto",
            help="Weight quantization; auto = nf4 on CUDA, none on CPU."),
    Setting("device", "FARLABS_DEVICE", _device, "auto, cpu, cuda or cuda:N", "auto", help="Torch device."),
    Setting("location", "FARLABS_LOCATION", _text(64), "up to 64 printable characters", "Unknown",
            help="Geographic location reported to the coordinator."),
    Setting("heartbeat_interval", "FARLABS_HEARTBEAT_INTERVAL", _int_range(1, 3600),
            "whole seconds from 1 to 3600", "30",
            help="Seconds between heartbeats (the coordinator may ask for another)."),
    Setting("drain_timeout", "FARLABS_DRAIN_TIMEOUT", _int_range(0, 3600), "whole seconds from 0 to 3600", "15",
            help="On SIGTERM, seconds open inference sessions get to finish after the blocks are announced offline "
            "(keep it below the unit's TimeoutStopSec)."),
    Setting("port", "FARLABS_PORT", _int_range(0, 65535), "a port from 0 to 65535 (0 = any free port)", "31330",
            help="P2P listen port (TCP)."),
    Setting("host_maddrs", "FARLABS_HOST_MADDRS", _multiaddr_list,
            f"comma-separated multiaddrs {_MADDR_FORM}, e.g. /ip4/0.0.0.0/tcp/31330", "",
            help="Listen multiaddrs; overrides --port."),
    Setting("announce_maddrs", "FARLABS_ANNOUNCE_MADDRS", _multiaddr_list,
            f"comma-separated multiaddrs {_MADDR_FORM}, e.g. /dns4/gpu1.example.com/tcp/31330", "",
            help="Public multiaddrs announced to peers (behind NAT or port forwarding)."),
    Setting("public_name", "FARLABS_PUBLIC_NAME", _text(64), "up to 64 printable characters", "",
            help="Name shown to clients and in the swarm monitor."),
    Setting("cache_dir", "FARLABS_CACHE_DIR", Path, "a directory path", None,
            help="Model weights cache (default: ~/.cache/farworker)."),
    Setting("max_disk_space", "FARLABS_MAX_DISK_SPACE", parse_size, "a size such as 200GB or 1.5TiB (0 = no limit)",
            "0", help="Disk budget of the weights cache."),
    Setting("state_dir", "FARLABS_STATE_DIR", Path, "a directory path", None,
            help="Identity key, usage outbox and status file (default: ~/.local/state/farworker)."),
    Setting("thread_policy", "FARLABS_THREAD_POLICY", _choice(THREAD_POLICIES), ", ".join(THREAD_POLICIES),
            "single", help="OpenMP threads: single (1 per process), passive (no spin-wait) or spin (torch default)."),
    Setting("step_batching", "FARLABS_STEP_BATCHING", _bool, "true or false", "true",
            help="Run concurrent decode steps of different sessions over our blocks as one call (Llama blocks)."),
    Setting("network_mbps", "FARLABS_NETWORK_MBPS", _positive_float, "a positive number of megabits per second",
            "100", help="Upload bandwidth used for the throughput announced to clients (no speedtest is run)."),
    Setting("metrics_port", "FARLABS_METRICS_PORT", _int_range(0, 65535), "a port from 0 to 65535 (0 = off)", "0",
            help="Prometheus /metrics on 127.0.0.1 (0 = off)."),
    Setting("instance", "FARLABS_INSTANCE", _instance, "a whole number from 0 to 63, or empty", "",
            help="This worker's index on a multi-GPU host (farworker@N.service): its state dir is STATE_DIR/N, "
            "its ports and metrics port are the configured ones plus N (see apply_instance in farworker/config.py)."),
    Setting("gpu", "FARLABS_GPU", _gpu, "a GPU index from 0 to 63, a GPU UUID (GPU-... or MIG-...), cpu, or empty",
            "", help="The one GPU this worker uses (CUDA_VISIBLE_DEVICES is set to its UUID); cpu hides every GPU; "
            "empty = no pinning."),
    Setting("host_id", "FARLABS_HOST_ID", _host_id, "up to 64 letters, digits, '.', '_' or '-', or empty", "",
            help="Groups this host's workers in the coordinator's ledger (default: derived from /etc/machine-id)."),
    Setting("hf_token", "HF_TOKEN", _text(512), "a Hugging Face access token", "", secret=True,
            help="Hugging Face token, needed for gated models such as Llama-2."),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class WorkerConfig:
    wallet_address: str
    dht_bootstrap: tuple[str, ...]
    new_swarm: bool
    model_name: str
    allow_local_model: bool
    api_base_url: str
    num_blocks: int | None
    block_indices: tuple[int, int] | None
    torch_dtype: str
    quant_type: str
    device: str
    location: str
    heartbeat_interval: int
    drain_timeout: int
    port: int
    host_maddrs: tuple[str, ...]
    announce_maddrs: tuple[str, ...]
    public_name: str
    cache_dir: Path
    max_disk_space: int | None
    state_dir: Path
    thread_policy: str
    step_batching: bool
    network_mbps: float
    metrics_port: int
    instance: int | None
    gpu: str
    host_id: str
    hf_token: str = field(repr=False)

    @property
    def api_base_urls(self) -> tuple[str, ...]:
        """The coordinator replicas, in the order the worker tries them (api_client.CoordinatorClient)."""
        return tuple(self.api_base_url.split(","))

    @property
    def is_tiny_model(self) -> bool:
        return self.model_name == TINY_MODEL_NAME

    @property
    def is_local_model(self) -> bool:
        return self.allow_local_model and Path(self.model_name).is_dir()

    @property
    def initial_peers(self) -> list[str]:
        return list(self.dht_bootstrap)

    @property
    def listen_maddrs(self) -> list[str]:
        return list(self.host_maddrs) or [f"/ip4/0.0.0.0/tcp/{self.port}"]

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "identity.key"


def _default_dirs(environ: Mapping[str, str]) -> dict[str, str]:
    home = Path(environ.get("HOME", "~")).expanduser()
    return {
        "cache_dir": environ.get("CACHE_DIRECTORY") or str(home / ".cache" / "farworker"),
        "state_dir": environ.get("STATE_DIRECTORY") or str(home / ".local" / "state" / "farworker"),
    }


def load_config(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | None] | None = None,
    *,
    required: bool = True,
) -> WorkerConfig:
    """Build the config from flags (overrides, raw strings) over the environment over defaults.

    Raises ConfigError listing every problem. With required=False, missing required values are allowed
    (used by `check` and `status` to look at a partial configuration).
    """
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    dirs = _default_dirs(environ)  # systemd's StateDirectory=/CacheDirectory= set these variables
    values: dict[str, object] = {}
    invalid: set[str] = set()
    problems: list[str] = []
    for setting in SETTINGS:
        raw = overrides.get(setting.name)
        source = setting.flag
        if raw is None:
            raw = environ.get(setting.env)
            source = setting.env
        if raw is None:
            raw = setting.default if setting.default is not None else dirs.get(setting.name)
        if raw is None:
            values[setting.name] = None
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except (_Invalid, ValueError) as error:
            shown = "(hidden)" if setting.secret else repr(raw)
            # which item of a list failed, and why; only our own parsers say so (never a secret's value)
            why = f" ({error})" if isinstance(error, _Invalid) and error.args and not setting.secret else ""
            problems.append(f"{source}={shown} is invalid{why}: expected {setting.accepted}")
            values[setting.name] = None
            invalid.add(setting.name)

    problems += _cross_checks(values, invalid, required)
    if problems:
        raise ConfigError(problems)
    values = apply_instance(values)  # FARLABS_INSTANCE: this instance's own state dir and ports
    values["dht_bootstrap"] = values["dht_bootstrap"] or ()
    return WorkerConfig(**values)  # type: ignore[arg-type]


def _cross_checks(values: dict[str, object], invalid: set[str], required: bool) -> list[str]:
    problems = []
    if required:
        for name in ("wallet_address", "api_base_url"):
            if values[name] is None and name not in invalid:  # an invalid value was reported already
                setting = SETTINGS_BY_NAME[name]
                problems.append(f"{setting.env} is required: expected {setting.accepted}")
        if not values["dht_bootstrap"] and values["new_swarm"] is False and "dht_bootstrap" not in invalid:
            problems.append(
                "FARLABS_DHT_BOOTSTRAP is required unless FARLABS_NEW_SWARM=true: expected "
                + SETTINGS_BY_NAME["dht_bootstrap"].accepted
            )
    model = values["model_name"]
    if isinstance(model, str) and model not in SUPPORTED_MODELS and model != TINY_MODEL_NAME:
        if not values["allow_local_model"]:
            problems.append(
                f"FARLABS_MODEL_NAME={model!r} is not allowed: expected {SETTINGS_BY_NAME['model_name'].accepted}"
            )
        elif not Path(model).is_dir():
            problems.append(f"FARLABS_MODEL_NAME={model!r} is not a directory: expected a local checkpoint directory")
    if values["num_blocks"] is not None and values["block_indices"] is not None:
        problems.append("FARLABS_NUM_BLOCKS and FARLABS_BLOCK_INDICES conflict: expected only one of them")
    device, pinned = values["device"], values["gpu"]
    if pinned == "cpu" and isinstance(device, str) and device.startswith("cuda"):
        problems.append(f"FARLABS_GPU=cpu and FARLABS_DEVICE={device} conflict: expected FARLABS_DEVICE auto or cpu")
    elif pinned and pinned != "cpu" and device not in (None, "auto", "cuda", "cuda:0"):
        # the pinned GPU is the only one CUDA sees: it is cuda:0 inside the process
        problems.append(f"FARLABS_GPU={pinned} and FARLABS_DEVICE={device} conflict: expected FARLABS_DEVICE "
                        "auto, cuda or cuda:0 (the pinned GPU is the process's only CUDA device)")
    problems += instance_port_problems(values)
    return problems


# -- FARLABS_INSTANCE: one worker per GPU (farworker@N.service, see farworker/instances.py) -----------------
# Every instance reads the host's one env file; what it owns derives from N. Its state dir is STATE_DIR/N (its
# own identity key, usage outbox and status file); its P2P port, the ports of its listen and announce multiaddrs
# and its metrics port are the configured ones plus N (0 stays 0: any free port, or metrics off).
def apply_instance(values: dict) -> dict:
    """The parsed settings of instance FARLABS_INSTANCE (unchanged when it is unset)."""
    index = values.get("instance")
    if index is None:
        return values
    shifted = dict(values)
    shifted["state_dir"] = Path(values["state_dir"]) / str(index)
    if values["port"]:
        shifted["port"] = values["port"] + index
    if values["metrics_port"]:
        shifted["metrics_port"] = values["metrics_port"] + index
    shifted["host_maddrs"] = tuple(shift_port(m, index) for m in values["host_maddrs"] or ())
    shifted["announce_maddrs"] = tuple(shift_port(m, index) for m in values["announce_maddrs"] or ())
    return shifted


def shift_port(maddr: str, offset: int) -> str:
    """/ip4/203.0.113.7/tcp/31330 + 2 -> /ip4/203.0.113.7/tcp/31332; port 0 (any) stays 0."""
    parts = maddr.split("/")
    for i in range(len(parts) - 1):
        if parts[i] in ("tcp", "udp") and parts[i + 1].isdigit() and int(parts[i + 1]):
            parts[i + 1] = str(int(parts[i + 1]) + offset)
    return "/".join(parts)


def instance_port_problems(values: dict) -> list[str]:
    """A port that the instance's offset pushes past 65535, named as the operator wrote it."""
    index = values.get("instance")
    if not index:
        return []
    problems = []
    for name, env in (("port", "FARLABS_PORT"), ("metrics_port", "FARLABS_METRICS_PORT")):
        port = values.get(name)
        if port and port + index > 65535:
            problems.append(f"{env}={port} plus FARLABS_INSTANCE={index} is past 65535: expected a port "
                            f"from 1 to {65535 - index}")
    for name, env in (("host_maddrs", "FARLABS_HOST_MADDRS"), ("announce_maddrs", "FARLABS_ANNOUNCE_MADDRS")):
        for maddr in values.get(name) or ():
            if any(int(p) > 65535 for p in _ports(shift_port(maddr, index))):
                problems.append(f"{env}={maddr} plus FARLABS_INSTANCE={index} is past port 65535: expected "
                                f"ports up to {65535 - index}")
    return problems


def _ports(maddr: str) -> list[str]:
    parts = maddr.split("/")
    return [parts[i + 1] for i in range(len(parts) - 1) if parts[i] in ("tcp", "udp") and parts[i + 1].isdigit()]
