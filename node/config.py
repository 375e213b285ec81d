"""The node's TOML config: its types, loading with precise error messages, and the template
that `aihub init` writes.

Provider API keys are never stored in the config: a deployment names the environment variable
that holds its key (`api_key_env`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct

from adapters.types import Upstream

CONFIG_FILE = "config.toml"
DATABASE_FILE = "aihub.db"
IDENTITY_FILE = "identity.key"

Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
Micros = Annotated[int, Meta(ge=0)]
Provider = Literal[
    "openai",
    "azure",
    "anthropic",
    "ollama",
    "echo",
    "bedrock",
    # --- gemini / vertex (issue 18)
    "gemini",
    "vertex",
    # --- end gemini / vertex
]
# Kinds of request that only an OpenAI-compatible upstream serves.
OPENAI_ONLY_KINDS = ("completions", "images", "moderations")
# --- bedrock ---
# `us-east-1`, `eu-central-2`, `us-gov-west-1`: a region becomes part of a host name.
AWS_REGION = r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$"
# --- end bedrock ---
Strategy = Literal["priority", "lowest-cost", "lowest-latency", "least-busy", "weighted"]


class NodeSection(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    # The currency of every amount, which the CLI shows amounts in (`node.units.amount`). The
    # amounts themselves, signed ones too, are plain micro-units: the nodes of a network agree
    # on the currency among themselves.
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")] = "USD"


MAX_WORKERS = 64


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cores() -> int:
    """The cores this process may use, at least 1: its affinity mask (`taskset`, a container's
    cpuset), not the machine's count, and no more than its cgroup's CPU quota (`docker run
    --cpus`, systemd's `CPUQuota=`), rounded up."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        count = os.cpu_count() or 1
    try:
        quota = quota_cpus(CPU_MAX.read_text())
    except OSError:
        quota = None
    return max(1, min(count, quota) if quota else count)


def quota_cpus(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none) allows,
    rounded up; None for no quota or a line that does not read."""
    fields = cpu_max.split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    quota, period = int(fields[0]), int(fields[1])
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)


class ServerSection(Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8787
    # Worker processes; unset: one per core (`worker_count`). Rate limits, max_parallel,
    # replay refusal and budget leases are decided in the store, so they hold across them.
    workers: Annotated[int, Meta(ge=1, le=MAX_WORKERS)] | None = None
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    # Client connections (conn-hardening): a request's head must arrive within header_timeout
    # of its first byte, its body within body_timeout of its head (else 408); an idle kept-alive
    # connection closes after keepalive_timeout; past max_connections (per worker process) a
    # new connection is answered 503 and closed. The idle timeout is nginx's 75 s, above the
    # 30 s for which a node's own pool keeps a peer's connection (adapters/http.py): with
    # uvicorn's 5 s a peer reused a connection this node was closing, or, after any pause of
    # more than 5 s, opened a new one (and its TLS handshake) for the next hop; SDK clients
    # that pause between calls (a coding agent) likewise.
    header_timeout: Seconds = 10.0
    body_timeout: Seconds = 60.0
    keepalive_timeout: Seconds = 75.0
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000

    def worker_count(self) -> int:
        """`workers` if the config names it, else $WEB_CONCURRENCY (the convention uvicorn and
        gunicorn read), else one per core, at most MAX_WORKERS."""
        if self.workers is not None:
            return self.workers
        named = os.environ.get("WEB_CONCURRENCY", "").strip()
        if named.isdigit() and int(named) >= 1:
            return min(int(named), MAX_WORKERS)
        return min(cores(), MAX_WORKERS)


class UpstreamSection(Struct, forbid_unknown_fields=True):
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 600.0
    max_connections: Annotated[int, Meta(ge=1)] = 1000
    # An upstream is untrusted: a larger answer, or a larger single stream event, is a 502.
    max_response_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    max_event_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024


class RouterSection(Struct, forbid_unknown_fields=True):
    strategy: Strategy = "priority"
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    backoff_base: Seconds = 0.25
    backoff_max: Seconds = 8.0
    # A Retry-After longer than this moves on to the next deployment instead of waiting.
    max_retry_wait: Annotated[float, Meta(ge=0)] = 10.0
    cooldown_failures: Annotated[int, Meta(ge=1)] = 3
    cooldown_seconds: Annotated[float, Meta(ge=0)] = 30.0
    # Overall deadlines, whatever an upstream does (hangs, drips bytes): one attempt at one
    # deployment, from its request to the last byte of its answer (a stream's included), and
    # the whole request across retries and fallbacks. Past either: a 504.
    attempt_timeout: Seconds = 600.0
    request_timeout: Seconds = 900.0
    fallbacks: dict[str, list[str]] = {}


class AlertsSection(Struct, forbid_unknown_fields=True):
    # POSTed a JSON event when a key or tenant passes a threshold of its budget; empty: the
    # alert is only written to the audit log.
    webhook_url: Annotated[str, Meta(pattern=r"^(https?://.+)?$")] = ""
    thresholds: Annotated[list[Annotated[int, Meta(ge=1, le=100)]], Meta(max_length=10)] = (
        msgspec.field(default_factory=lambda: [50, 80, 100])
    )
    retries: Annotated[int, Meta(ge=0, le=20)] = 5
    backoff_base: Seconds = 1.0


class FederationSection(Struct, forbid_unknown_fields=True):
    # How peers reach this node (a reverse proxy's https:// URL on a public server); empty:
    # http://host:port from [server].
    public_urls: list[Annotated[str, Meta(pattern=r"^https?://[^/]+/?$")]] = []
    # Seeds: node URLs, optionally with a pinned node id: "ed25519:…@https://host:8787".
    seeds: list[str] = []
    # Tell peers about this node in peer exchange.
    listed: bool = False
    mdns: bool = False
    mdns_interface: str = ""
    advert_ttl: Annotated[int, Meta(ge=60, le=7 * 86400)] = 3600
    # Peers' adverts are fetched with each health check; books are compared less often.
    reconcile_interval: Annotated[int, Meta(ge=10, le=7 * 86400)] = 3600
    health_interval: Annotated[int, Meta(ge=1, le=3600)] = 30
    # Join requests without an invite (conn-hardening): strangers make them, so at most
    # max_join_requests wait for approval, at most max_join_requests_per_source from one
    # address, each for join_request_ttl seconds; past a bound the answer is 429.
    max_join_requests: Annotated[int, Meta(ge=1, le=100_000)] = 100
    max_join_requests_per_source: Annotated[int, Meta(ge=1, le=100_000)] = 5
    join_request_ttl: Annotated[int, Meta(ge=1, le=365 * 86400)] = 7 * 86400


# --- guardrails (issue 15): profiles of checks on the request path (node/gateway/guardrails/) --
Action = Literal["block", "redact", "log"]
# Presidio's names for what its pattern recognizers find offline.
PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS")
# What Presidio's spaCy recognizer finds, with an NER pipeline installed (`ner_model`).
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME")
Region = Annotated[str, Meta(pattern="^[A-Z]{2}$")]
CheckName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class _Check(Struct, forbid_unknown_fields=True, tag_field="kind", kw_only=True):
    action: Action = "block"
    # What errors, audit events and metrics call it; empty: its kind.
    name: CheckName | None = None


class PiiCheck(_Check, tag="pii"):
    entities: list[str] = msgspec.field(default_factory=lambda: list(PII_ENTITIES))
    # Presidio's confidence from which a finding counts (its patterns score 0.05 to 1.0).
    min_score: Annotated[float, Meta(ge=0, le=1)] = 0.4
    # An installed spaCy pipeline (a package name such as `en_core_web_sm`, or a folder) for
    # names and places (NER_ENTITIES); never downloaded. Empty: patterns only.
    ner_model: str = ""
    # Where phone numbers written without a country code are read as from (ISO codes).
    phone_regions: Annotated[list[Region], Meta(max_length=8)] = msgspec.field(
        default_factory=lambda: ["US", "GB"]
    )
    # On requests; also on answers (`redact` or `log` only: an answer is never refused half
    # sent).
    input: bool = True
    output: bool = False


class SecretsCheck(_Check, tag="secrets"):
    input: bool = True
    output: bool = False


class BannedCheck(_Check, tag="banned"):
    # Words or phrases, matched whole and case-blind after Unicode folding.
    words: Annotated[list[Annotated[str, Meta(min_length=1, max_length=200)]], Meta(min_length=1)]


class SizeCheck(_Check, tag="size"):
    max_chars: Annotated[int, Meta(ge=1)]


class InjectionCheck(_Check, tag="injection"):
    # The score (0 to 1) from which a text counts as a prompt injection or jailbreak.
    threshold: Annotated[float, Meta(gt=0, le=1)] = 0.5


class WebhookCheck(_Check, tag="webhook"):
    """An external guardrail: POSTed the request's texts, it answers allow, block or the texts
    redacted. `action = "log"` makes it advisory (what it says is only recorded)."""

    url: Annotated[str, Meta(pattern=r"^https?://.+")]
    timeout: Annotated[float, Meta(gt=0, le=60)] = 2.0
    # What an unreachable, slow or garbled hook means: "allow" (fail open) or "block" (closed).
    on_error: Literal["allow", "block"] = "block"


class ModerationCheck(_Check, tag="moderation"):
    """A `/v1/moderations`-compatible deployment (a `[[models]]` entry of kind
    "moderations") is sent the request's texts (and, with `output`, an answer's, a streamed
    one's whole before its end): what it flags blocks or is logged."""

    deployment: Annotated[str, Meta(min_length=1, max_length=256)]
    # Only these of its categories count (OpenAI's: "harassment", "violence/graphic", …);
    # empty: any it flags.
    categories: Annotated[list[str], Meta(max_length=64)] = []
    timeout: Annotated[float, Meta(gt=0, le=60)] = 5.0
    # What an unreachable, slow or garbled deployment means: "allow" (fail open) or "block".
    on_error: Literal["allow", "block"] = "block"
    input: bool = True
    # Answers too: a complete one before it is returned, a streamed one whole before its end.
    output: bool = False


Check = (
    PiiCheck
    | SecretsCheck
    | BannedCheck
    | SizeCheck
    | InjectionCheck
    | WebhookCheck
    | ModerationCheck
)


class GuardrailProfile(Struct, forbid_unknown_fields=True):
    checks: Annotated[list[Check], Meta(min_length=1)]
    # Characters of a streamed answer held back so that what spans chunks is still caught:
    # longer than the PII it catches (an IBAN is 34, an IPv6 address 39, most emails under
    # 64), short enough that the first text waits for ~40 tokens, not 100.
    hold_back: Annotated[int, Meta(ge=16, le=4096)] = 128


class GuardrailsSection(Struct, forbid_unknown_fields=True):
    profiles: dict[str, GuardrailProfile] = {}
    # Which profile applies: a key's (by name or id), else its tenant's (by name), else, for
    # a peer's request, `peers` (the provider's own profile for what peers send), else
    # `default`. Empty: none.
    keys: dict[str, str] = {}
    tenants: dict[str, str] = {}
    peers: str = ""
    default: str = ""


def _guardrails_problems(
    section: GuardrailsSection, deployments: dict[str, Deployment] | None = None
) -> list[str]:
    problems: list[str] = []
    named = [("guardrails.default", section.default), ("guardrails.peers", section.peers)]
    named += [(f"guardrails.keys.{k}", v) for k, v in section.keys.items()]
    named += [(f"guardrails.tenants.{k}", v) for k, v in section.tenants.items()]
    for where, profile in named:
        if profile and profile not in section.profiles:
            problems.append(f"{where}: {profile!r} is not a profile in [guardrails.profiles]")
    for name, profile in section.profiles.items():
        where = f"guardrails.profiles.{name}"
        for index, check in enumerate(profile.checks):
            if isinstance(check, PiiCheck):
                known = PII_ENTITIES + NER_ENTITIES if check.ner_model else PII_ENTITIES
                unknown = sorted(set(check.entities) - set(known))
                if unknown:
                    problems.append(
                        f"{where}.checks[{index}]: unknown entities {unknown}; "
                        f"known: {list(known)}"
                        + ("" if check.ner_model else f" ({list(NER_ENTITIES)} with ner_model)")
                    )
            output = isinstance(check, PiiCheck | SecretsCheck) and check.output
            if output and check.action == "block":
                problems.append(f"{where}.checks[{index}]: an output check redacts or logs")
            if isinstance(check, SizeCheck | InjectionCheck | WebhookCheck):
                kind = check.__struct_config__.tag
                if check.action == "redact":  # a webhook enforces what it answers, or logs it
                    problems.append(f"{where}.checks[{index}]: a {kind} check blocks or logs")
            both = PiiCheck | SecretsCheck | ModerationCheck
            if isinstance(check, both) and not (check.input or check.output):
                problems.append(f"{where}.checks[{index}]: neither input nor output")
            if isinstance(check, ModerationCheck):
                problems += _moderation_problems(check, f"{where}.checks[{index}]", deployments)
    return problems


def _moderation_problems(
    check: ModerationCheck, where: str, deployments: dict[str, Deployment] | None
) -> list[str]:
    if check.action == "redact":
        return [f"{where}: a moderation check blocks or logs"]
    if deployments is None:
        return []
    deployment = deployments.get(check.deployment)
    if deployment is None or deployment.kind != "moderations":
        return [f"{where}: {check.deployment!r} is not a [[models]] entry of kind moderations"]
    return []


# --- end guardrails


class Deployment(Struct, forbid_unknown_fields=True):
    """One way of serving a model name: a provider, its upstream model and its price."""

    name: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\s@]+$")]
    provider: Provider
    model: str | None = None
    # What the deployment serves: chat, embeddings, or (OpenAI-compatible providers only)
    # legacy text completions, image generations and moderations (the last only for the
    # guardrails' moderation checks: `ModerationCheck`).
    kind: Literal["chat", "embeddings", "completions", "images", "moderations"] = "chat"
    base_url: str | None = None
    api_key_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    api_version: str | None = None
    headers: dict[str, str] = {}
    price_in: Micros = 0
    price_out: Micros = 0
    # Micros per image generated (a deployment of kind "images"; its token prices are unused).
    price_per_image: Micros = 0
    priority: int = 0
    weight: Annotated[int, Meta(ge=1, le=1000)] = 1
    context: Annotated[int, Meta(ge=1)] | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] = 4096
    # What a request that sets no max_tokens reserves of every budget for its output (unset:
    # max_output_tokens; less, down to a floor, with the upstream's output capped to match,
    # when a budget has less left: `pipeline.begin_chat`). An answer longer than this is
    # charged only up to what was reserved (the rest is recorded as unbilled), so a budget
    # still never passes its cap.
    reserve_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    connect_timeout: Seconds | None = None
    read_timeout: Seconds | None = None
    # An openai or azure chat deployment whose upstream serves OpenAI's Responses API (OpenAI's
    # own does; most OpenAI-compatible servers do not): a /v1/responses request is passed to
    # its `/responses` as the client wrote it, rather than translated into chat completions.
    responses: bool = False
    latency_ms: Annotated[int, Meta(ge=0, le=60_000)] = 0
    embedding_dims: Annotated[int, Meta(ge=1, le=8192)] = 64
    # --- bedrock: the AWS region (else the credential chain's: AWS_REGION, the profile's)
    # and the profile of the shared AWS config files whose credentials sign the requests ---
    region: Annotated[str, Meta(pattern=AWS_REGION)] | None = None
    profile: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.@+=,-]{1,128}$")] | None = None
    # --- end bedrock ---
    # --- gemini / vertex (issue 18): Vertex AI's Google Cloud project and region ("global"
    # too), and the service account's JSON key file; without one, Google's Application
    # Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the metadata
    # server of a Google Cloud machine).
    project: Annotated[str, Meta(pattern=r"^[A-Za-z0-9.:-]{1,128}$")] | None = None
    location: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,64}$")] | None = None
    credentials_file: str | None = None
    # --- end gemini / vertex

    def unit_prices(self) -> tuple[int, int]:
        """Micros per million units in and out, as the usage's counts are priced: tokens,
        or for images one unit out per image (`price_per_image` each)."""
        if self.kind == "images":
            return 0, self.price_per_image * 1_000_000
        return self.price_in, self.price_out

    def upstream(self, defaults: UpstreamSection, env: dict[str, str]) -> Upstream:
        return Upstream(
            provider=self.provider,
            model=self.model or self.name,
            base_url=self.base_url or "",
            api_key=env.get(self.api_key_env) if self.api_key_env else None,
            api_version=self.api_version,
            headers=self.headers,
            connect_timeout=self.connect_timeout or defaults.connect_timeout,
            read_timeout=self.read_timeout or defaults.read_timeout,
            max_output_tokens=self.max_output_tokens,
            max_response_bytes=defaults.max_response_bytes,
            max_event_bytes=defaults.max_event_bytes,
            responses=self.responses,
            latency_ms=self.latency_ms,
            embedding_dims=self.embedding_dims,
            region=self.region,
            profile=self.profile,
            # --- gemini / vertex (issue 18)
            project=self.project,
            location=self.location,
            credentials_file=(
                str(Path(self.credentials_file).expanduser()) if self.credentials_file else None
            ),
            # --- end gemini / vertex
        )


class StorageSection(Struct, forbid_unknown_fields=True):
    # Where the node keeps its state: empty for the SQLite file in the data folder (nothing
    # to run), or `postgresql://user@host:port/database` for a node on several processes or
    # hosts sharing one database. The password is never in this file: `password_env` names
    # the environment variable that holds it.
    url: Annotated[str, Meta(max_length=2048)] = ""
    password_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # Connections each process keeps open to PostgreSQL (at most).
    pool_size: Annotated[int, Meta(ge=1, le=1000)] = 10


class LogSection(Struct, forbid_unknown_fields=True):
    # What `aihub serve` writes to stderr: this level and up (`--log-level` overrides it), as
    # text or as JSON lines, with an access-log line per request (`node.observe.access`).
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool = False
    access: bool = True


class TracingSection(Struct, forbid_unknown_fields=True):
    # Where OTLP/HTTP traces go (e.g. "http://127.0.0.1:4318/v1/traces"); empty: no tracing,
    # and nothing of OpenTelemetry is loaded (`pip install 'aihub[otel]'` to use it).
    otlp_endpoint: Annotated[str, Meta(pattern=r"^(https?://.+)?$")] = ""
    service_name: Annotated[str, Meta(min_length=1, max_length=64)] = "aihub"


CacheGlob = Annotated[str, Meta(min_length=1, max_length=256)]


class CacheSection(Struct, forbid_unknown_fields=True):
    """The response cache (`node/gateway/cache.py`): off unless a key, its tenant or one of
    `models` turns it on."""

    # Models (globs) whose answers are cached for every key that does not say otherwise.
    models: Annotated[list[CacheGlob], Meta(max_length=256)] = []
    ttl: Annotated[int, Meta(ge=1, le=30 * 86400)] = 3600
    max_entries: Annotated[int, Meta(ge=1, le=10_000_000)] = 10_000
    # Kept in each process's memory too, in front of the store.
    memory_entries: Annotated[int, Meta(ge=0, le=100_000)] = 256
    # An answer (or a stream's events) larger than this is not kept.
    max_answer_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # A hit costs nothing unless this says to charge it as the model's price would.
    bill_hits: bool = False


class InteractionLogSection(Struct, forbid_unknown_fields=True):
    """Interaction logs (`node/gateway/interaction_log.py`), for keys or tenants that opt in."""

    retention_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    # All entries' bodies together: past this, the oldest go at the next prune.
    max_bytes: Annotated[int, Meta(ge=1024, le=1 << 40)] = 256 * 1024 * 1024
    # Each body (request, answer) is cut here.
    max_body_bytes: Annotated[int, Meta(ge=256, le=64 * 1024 * 1024)] = 64 * 1024
    prune_interval: Annotated[int, Meta(ge=1, le=86400)] = 3600


class Config(Struct, forbid_unknown_fields=True):
    node: NodeSection
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    upstream: UpstreamSection = msgspec.field(default_factory=UpstreamSection)
    router: RouterSection = msgspec.field(default_factory=RouterSection)
    alerts: AlertsSection = msgspec.field(default_factory=AlertsSection)
    federation: FederationSection = msgspec.field(default_factory=FederationSection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    tracing: TracingSection = msgspec.field(default_factory=TracingSection)
    guardrails: GuardrailsSection = msgspec.field(default_factory=GuardrailsSection)
    cache: CacheSection = msgspec.field(default_factory=CacheSection)
    interaction_logs: InteractionLogSection = msgspec.field(default_factory=InteractionLogSection)
    models: list[Deployment] = []
    storage: StorageSection = msgspec.field(default_factory=StorageSection)

    def public_urls(self) -> list[str]:
        if self.federation.public_urls:
            return [url.rstrip("/") for url in self.federation.public_urls]
        return [f"http://{self.server.host}:{self.server.port}"]


class ConfigError(Exception):
    """The config cannot be used; the message says what is wrong and where."""


def data_dir(option: str | None) -> Path:
    return Path(option or os.environ.get("AIHUB_HOME") or Path.home() / ".aihub").expanduser()


def parse_config(text: bytes, source: str = CONFIG_FILE) -> Config:
    try:
        text.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid UTF-8 (byte {exc.start})") from exc
    try:
        config = msgspec.toml.decode(text, type=Config)
    except msgspec.ValidationError as exc:
        from node.config_errors import describe

        raise ConfigError(f"{source}: {describe(exc, text.decode(), Config)}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    problems = semantic_problems(config) + storage_problems(config.storage)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def semantic_problems(config: Config) -> list[str]:
    """What the types alone cannot catch: dangling fallbacks, provider-specific needs."""
    problems: list[str] = []
    names = {deployment.name for deployment in config.models}
    for source, targets in config.router.fallbacks.items():
        if source not in names:
            problems.append(f"router.fallbacks: {source!r} is not a configured model")
        for target in targets:
            if target not in names:
                problems.append(f"router.fallbacks.{source}: {target!r} is not a configured model")
    for index, deployment in enumerate(config.models):
        where = f"models[{index}] ({deployment.name})"
        if deployment.provider == "azure" and not (deployment.base_url and deployment.model):
            problems.append(f"{where}: azure needs base_url (the resource URL) and model")
        if deployment.provider == "anthropic" and deployment.kind == "embeddings":
            problems.append(f"{where}: anthropic serves no embeddings")
        if deployment.kind in OPENAI_ONLY_KINDS and deployment.provider not in ("openai", "azure"):
            problems.append(f"{where}: {deployment.provider} serves no {deployment.kind}")
        if deployment.responses and (
            deployment.provider not in ("openai", "azure") or deployment.kind != "chat"
        ):
            problems.append(f"{where}: responses is for an openai or azure chat deployment")
        if deployment.price_per_image and deployment.kind != "images":
            problems.append(f"{where}: price_per_image is for a deployment of kind images")
        if deployment.base_url and not deployment.base_url.startswith(("http://", "https://")):
            problems.append(f"{where}: base_url must start with http:// or https://")
        problems += _bedrock_problems(deployment, where)
        problems += _google_problems(where, deployment)
    deployments = {deployment.name: deployment for deployment in config.models}
    problems += _guardrails_problems(config.guardrails, deployments)
    return problems


# --- bedrock ---
def _bedrock_problems(deployment: Deployment, where: str) -> list[str]:
    if deployment.provider != "bedrock":
        if deployment.region or deployment.profile:
            return [f"{where}: region and profile are for a bedrock deployment"]
        return []
    if deployment.kind == "embeddings":
        # Bedrock's embedding models answer InvokeModel in each model's own format, not Converse.
        return [f"{where}: bedrock serves no embeddings"]
    return []


# --- end bedrock ---


# --- gemini / vertex (issue 18) ---------------------------------------------------------------


def _google_problems(where: str, deployment: Deployment) -> list[str]:
    """What a Gemini API or Vertex AI deployment needs; Vertex's fields belong to it alone."""
    problems: list[str] = []
    vertex_fields = [
        name for name in ("project", "location", "credentials_file") if getattr(deployment, name)
    ]
    if deployment.provider == "gemini" and not deployment.api_key_env:
        problems.append(f"{where}: gemini needs api_key_env (the variable holding the API key)")
    if deployment.provider != "vertex" and vertex_fields:
        problems.append(f"{where}: {', '.join(vertex_fields)} are for provider vertex only")
    if deployment.provider == "vertex":
        if not (deployment.project and deployment.location):
            problems.append(f"{where}: vertex needs project and location")
        # Imported here: adapters.vertex brings aiohttp and google-auth, which `aihub config
        # check` and every other command that reads the config have no use for.
        from adapters.vertex import is_anthropic_model  # gemini / vertex (issue 18)

        model = deployment.model or deployment.name
        if deployment.kind == "embeddings" and is_anthropic_model(model):
            problems.append(f"{where}: Anthropic models on vertex serve no embeddings")
    return problems


# --- end gemini / vertex ----------------------------------------------------------------------


def missing_secrets(config: Config, env: dict[str, str]) -> list[str]:
    missing = [
        f"models[{index}] ({d.name}): environment variable {d.api_key_env} is not set"
        for index, d in enumerate(config.models)
        if d.api_key_env and not env.get(d.api_key_env)
    ]
    # --- gemini / vertex (issue 18): a service account's key file that is not there
    missing += [
        f"models[{index}] ({d.name}): credentials_file {d.credentials_file} is not a file"
        for index, d in enumerate(config.models)
        if d.credentials_file and not Path(d.credentials_file).expanduser().is_file()
    ]
    # --- end gemini / vertex
    password_env = config.storage.password_env
    if password_env and not env.get(password_env):
        missing.append(f"storage.password_env: environment variable {password_env} is not set")
    return missing


def storage_problems(storage: StorageSection) -> list[str]:
    """What is wrong with `[storage]`: a URL of a kind the node cannot open, or one that
    holds a password (a URL is shown in logs and process lists: the password comes from
    `password_env`)."""
    if not storage.url:
        if storage.password_env:
            return ["storage.password_env: only for a postgresql:// url"]
        return []
    scheme = storage.url.partition(":")[0]
    if scheme not in ("postgresql", "postgres", "sqlite"):
        return [f"storage.url: {scheme!r} is not postgresql:// or sqlite:"]
    if scheme == "sqlite":
        return []
    try:
        parts = urlsplit(storage.url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        return [f"storage.url: not a PostgreSQL URL ({exc})"]
    problems = []
    if parts.password is not None:
        problems.append(
            "storage.url: holds a password; remove it, and name the environment variable"
            " that holds it in storage.password_env"
        )
    if not parts.hostname:
        problems.append("storage.url: names no host")
    if not parts.path.strip("/"):
        problems.append("storage.url: names no database")
    return problems


class StoreTarget(NamedTuple):
    """Where a node's store is and how to open it (`node.storage.opened(**target._asdict())`)."""

    url: str | Path
    password: str | None
    pool_size: int


def store_target(directory: Path, config: Config | None = None) -> StoreTarget:
    """The store of the node in `directory`, as its config names it: the SQLite file in the
    folder unless `[storage] url` says otherwise (a node without a config yet, mid-`aihub
    init`, has the file). ConfigError when a PostgreSQL password is named but not set."""
    if config is None and (directory / CONFIG_FILE).exists():
        config = load_config(directory)
    storage = config.storage if config is not None else StorageSection()
    if not storage.url:
        return StoreTarget(directory / DATABASE_FILE, None, storage.pool_size)
    password = None
    if storage.password_env:
        password = os.environ.get(storage.password_env)
        if not password:
            raise ConfigError(
                f"storage.password_env: environment variable {storage.password_env} is not set"
            )
    url: str | Path = storage.url
    if storage.url.startswith("sqlite:") and not storage.url.startswith("sqlite:///"):
        url = directory / storage.url.removeprefix("sqlite:")  # relative to the data folder
    return StoreTarget(url, password, storage.pool_size)


def load_config(directory: Path) -> Config:
    path = directory / CONFIG_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"no node at {directory}: run `aihub init` first") from exc
    return parse_config(text, str(path))


def render_template(name: str, port: int | None = None) -> str:
    text = CONFIG_TEMPLATE.replace("{name}", msgspec.json.encode(name).decode())
    if port is not None:
        text = text.replace("\nport = 8787\n", f"\nport = {port}\n", 1)
    return text


CONFIG_TEMPLATE = """\
# aihub node configuration. `aihub config check` validates this file.
# Prices are integer micro-units of the currency per million tokens ($2.50/1M = 2_500_000).

[node]
name = {name}
currency = "USD"

[storage]
url = ""                            # empty: aihub.db in this folder; or for several processes
                                    # or hosts, "postgresql://aihub@db.internal:5432/aihub"
# password_env = "AIHUB_DB_PASSWORD"  # the environment variable holding its password
pool_size = 10                      # PostgreSQL connections per process, at most

[server]
host = "127.0.0.1"
port = 8787
# workers = 2                       # processes; unset: one per core (or $WEB_CONCURRENCY)
max_body_bytes = 4_194_304          # larger requests get a 413
header_timeout = 10.0               # seconds for a request's head to arrive (else 408)
body_timeout = 60.0                 # seconds for its body to arrive after the head (else 408)
keepalive_timeout = 75.0            # idle seconds before a kept-alive connection is closed
max_connections = 1000              # per worker process; past it a connection gets a 503

[upstream]
connect_timeout = 5.0               # seconds
read_timeout = 600.0
max_connections = 1000              # pooled connections to all providers together
max_response_bytes = 67_108_864     # a larger answer from a provider is a 502
max_event_bytes = 1_048_576         # so is a larger single event of a stream

[router]
strategy = "priority"     # priority | lowest-cost | lowest-latency | least-busy | weighted
retries = 2                         # per deployment, on 429, 5xx, timeouts and connect errors
backoff_base = 0.25                 # seconds; doubles each retry, honours Retry-After
backoff_max = 8.0
max_retry_wait = 10.0               # a longer Retry-After moves on to the next deployment
cooldown_failures = 3               # consecutive failures before a deployment rests
cooldown_seconds = 30.0
attempt_timeout = 600.0             # seconds for one try at one deployment, stream included
request_timeout = 900.0             # seconds for a whole request, retries and fallbacks included

[router.fallbacks]
# "gpt-4o" = ["claude-sonnet", "llama3"]

[alerts]
webhook_url = ""                    # e.g. "https://hooks.example.com/aihub"; empty: audit log only
thresholds = [50, 80, 100]          # percent of a key's or tenant's budget
retries = 5                         # delivery attempts after the first, with doubling backoff
backoff_base = 1.0                  # seconds

[federation]
public_urls = []                    # how peers reach this node; empty: http://host:port above
seeds = []                          # node URLs, optionally pinned: "ed25519:…@https://host:8787"
listed = false                      # let peers tell other peers about this node
mdns = false                        # announce and discover nodes on the local network
mdns_interface = ""                 # an interface's IPv4 address; empty: all
advert_ttl = 3600                   # seconds a model advert stays valid
health_interval = 30                # seconds between peer health checks (and advert fetches)
reconcile_interval = 3600           # seconds between reconciliations of the ledger with peers

[log]
level = "info"                      # debug | info | warning | error (`aihub serve --log-level`)
json = false                        # true: one JSON object per line
access = true                       # a line per request: method, path, status, latency, key, model

[tracing]
otlp_endpoint = ""                  # OTLP/HTTP, e.g. "http://127.0.0.1:4318/v1/traces"; empty: off
service_name = "aihub"

[cache]                             # exact-match response cache, per tenant (or key); off unless
models = []                         # these models (globs), a tenant or a key turn it on
ttl = 3600                          # seconds an answer is kept
max_entries = 10000                 # answers kept in all (least recently used go first)
memory_entries = 256                # of them also in each process's memory
max_answer_bytes = 1048576          # a larger answer (or stream) is not kept
bill_hits = false                   # true: a hit is charged as if the model had answered

[interaction_logs]                  # bodies of the requests of keys or tenants with `log` on
retention_days = 30                 # entries older than this are forgotten
max_bytes = 268435456               # all bodies together; the oldest go first
max_body_bytes = 65536              # each request or answer body is cut here
prune_interval = 3600               # seconds between prunes

# Each [[models]] entry is one deployment. Several may share a `name`: the router picks
# among them by strategy and falls back in order.

# The built-in demo model: deterministic, no provider needed, with a small demo price so
# that budgets, usage and the ledger can be tried.
[[models]]
name = "echo"
provider = "echo"
price_in = 100_000
price_out = 200_000

[[models]]
name = "echo-embed"
provider = "echo"
kind = "embeddings"
price_in = 20_000

# --- OpenAI (or any OpenAI-compatible server: OpenRouter, vLLM, LM Studio, llama.cpp,
# LocalAI, Groq: change base_url) ---
# [[models]]
# name = "gpt-4o-mini"
# provider = "openai"
# model = "gpt-4o-mini"
# base_url = "https://api.openai.com/v1"
# api_key_env = "OPENAI_API_KEY"
# price_in = 150_000
# price_out = 600_000
# responses = true                  # the upstream serves /v1/responses: passed through as sent

# [[models]]
# name = "text-embedding-3-small"
# provider = "openai"
# kind = "embeddings"
# api_key_env = "OPENAI_API_KEY"
# price_in = 20_000

# --- Azure OpenAI: base_url is the resource, model the deployment name ---
# [[models]]
# name = "gpt-4o"
# provider = "azure"
# model = "my-gpt4o-deployment"
# base_url = "https://my-resource.openai.azure.com"
# api_version = "2024-10-21"
# api_key_env = "AZURE_OPENAI_API_KEY"
# price_in = 2_500_000
# price_out = 10_000_000

# --- Anthropic Messages API ---
# [[models]]
# name = "claude-sonnet"
# provider = "anthropic"
# model = "claude-sonnet-4-5"
# api_key_env = "ANTHROPIC_API_KEY"
# max_output_tokens = 8192
# reserve_output_tokens = 1024   # reserved when a request sets no max_tokens [max_output_tokens]
# price_in = 3_000_000
# price_out = 15_000_000

# --- Ollama, native API ---
# [[models]]
# name = "llama3"
# provider = "ollama"
# model = "llama3.1:8b"
# base_url = "http://127.0.0.1:11434"

# --- AWS Bedrock, Converse API: model is a model id or an inference profile; credentials
# come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared
# files' `profile`, SSO, an instance or container role), or set api_key_env to a Bedrock
# API key; region defaults to the chain's (AWS_REGION) ---
# [[models]]
# name = "claude-bedrock"
# provider = "bedrock"
# model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
# region = "us-east-1"
# profile = "default"
# max_output_tokens = 8192
# price_in = 3_000_000
# price_out = 15_000_000

# --- Google Gemini API (an API key from Google AI Studio) ---
# [[models]]
# name = "gemini-flash"
# provider = "gemini"
# model = "gemini-2.5-flash"
# api_key_env = "GEMINI_API_KEY"
# max_output_tokens = 8192
# price_in = 300_000
# price_out = 2_500_000

# [[models]]
# name = "gemini-embedding"
# provider = "gemini"
# kind = "embeddings"
# model = "gemini-embedding-001"
# api_key_env = "GEMINI_API_KEY"
# price_in = 150_000

# --- Vertex AI: Gemini and Claude models in a Google Cloud project, with a service
# account's JSON key (without credentials_file: Application Default Credentials) ---
# [[models]]
# name = "gemini-pro"
# provider = "vertex"
# model = "gemini-2.5-pro"
# project = "my-project"
# location = "us-central1"            # or "global"
# credentials_file = "/etc/aihub/vertex-sa.json"
# price_in = 1_250_000
# price_out = 10_000_000

# [[models]]
# name = "claude-sonnet-vertex"
# provider = "vertex"
# model = "claude-sonnet-4-5@20250929"  # a claude… model is Anthropic's, on rawPredict
# project = "my-project"
# location = "global"
# credentials_file = "/etc/aihub/vertex-sa.json"
# max_output_tokens = 8192
# price_in = 3_000_000
# price_out = 15_000_000
"""
