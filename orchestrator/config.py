"""The benchmark's run configuration: a YAML file validated into frozen dataclasses, then expanded into runs.

Unknown keys and wrong types are rejected with the key's path in the message. `expand` turns the drafts
list (gamma, mode and rtt_ms may be lists: sweeps) into one RunSpec per measured configuration, the
verifier-only baseline first, once at every emulated RTT any configuration uses, so each one is compared
with verifier-only generation through the same link. The embedded default (no --config) benchmarks the
offline Qwen pair: the LM drafter at gamma 1-4 and adaptive, and the n-gram drafter; `configs/pubmedqa.yaml`
documents every key.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, replace
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from specdec.config import DEFAULT_MODE, SPEC_MODES, SamplingParams

_STRICT = ConfigDict(extra="forbid", frozen=True)
Gamma = int | Literal["adaptive", "rtt", "auto"]


class ConfigError(ValueError):
    """The config file (or an override) is invalid; the message names the key."""


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _each(name: str, ok, requirement: str):
    """A validator for a field that holds a value or a list of them (a sweep): ok(each one), else an error
    saying the field must be `requirement`."""
    def check(cls, value):
        for v in _as_list(value):
            if v is not None and not ok(v):
                raise ValueError(f"{name} must be {requirement}, got {v!r}")
        return value
    return field_validator(name)(check)


def _each_at_least(name: str, low: float):
    return _each(name, lambda v: v >= low, f">= {low:g}")


def _each_mode(name: str):
    return _each(name, lambda v: v in SPEC_MODES, "one of " + ", ".join(SPEC_MODES))


@pydantic_dataclass(config=_STRICT)
class VerifierConfig:
    model: str = "offline:qwen2.5-coder-1.5b-instruct"  # Hub id, folder, .gguf or offline: alias
    dtype: str = "auto"  # bf16 where the hardware runs it natively (CUDA, AMX, AVX512-bf16), else fp32
    device: str = "auto"  # cpu | cuda[:N] | mps | auto
    # HOST:PORT of a running verifier, or several replicas ("a:1,b:2" or a list); None = start them as Ray actors
    address: str | list[str] | None = None
    replicas: int = Field(1, ge=1)  # Ray-started verifiers: each an actor with its own num_gpus and `verifier` resource
    num_gpus: float = 0  # GPUs each verifier actor asks Ray for (its node needs the `verifier` resource too)
    threads: int | None = Field(None, ge=1)  # CPU threads for torch; None = all of its node's cores
    # issue 18: grant draft budgets (every client, whatever its gamma, drafts at most the budget); false: verify
    # every draft token sent, to measure fixed gammas as they are (serve-verifier --no-draft-budget)
    draft_budget: bool = True


@pydantic_dataclass(config=_STRICT)
class TreeConfig:
    max_nodes: int = Field(ge=1, le=64)  # nodes of each token tree (issue 21); they count against max_gamma


@pydantic_dataclass(config=_STRICT)
class DraftConfig:
    name: str
    kind: Literal["lm", "ngram", "suffix"] = "lm"  # suffix: draft_worker/suffix.py, with its default settings
    model: str | None = None  # LM drafters: Hub id, folder, .gguf or offline: alias
    backend: Literal["transformers", "llama.cpp"] = "transformers"  # llama.cpp: GGUF drafts (dtype/device unused)
    dtype: str = "auto"  # as the verifier's
    device: str = "cpu"
    # a list is a sweep; "adaptive" = HF's +2/-1 heuristic; "rtt" = chosen per round from the measured link and steps;
    # "auto" = rtt's choice within the verifier's draft budget (issue 18)
    gamma: int | str | list[int | str] = 4
    rtt_ms: float | list[float] | None = None  # emulated RTT; None = the run's rtt_ms; a list is a sweep
    mode: str | list[str] | None = None  # lockstep | ahead | async (specdec.config.SPEC_MODES); None = the run's mode
    ngram_max: int = Field(3, ge=1)
    dense_dtype: Literal["fp16", "fp32"] = "fp16"  # wire dtype of full-vocabulary draft probabilities (sampling)
    tree: TreeConfig | None = None  # lm, suffix: propose token trees of tree.max_nodes nodes (lockstep mode only)

    _rtt_range = _each_at_least("rtt_ms", 0)
    _modes = _each_mode("mode")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, value):
        for g in value if isinstance(value, list) else [value]:
            if g not in ("adaptive", "rtt", "auto") and not (isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 64):
                raise ValueError(f"gamma must be an integer in [1, 64], 'adaptive', 'rtt' or 'auto', got {g!r}")
        return value


@pydantic_dataclass(config=_STRICT)
class SamplingConfig:
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, ge=0, le=1)
    seed: int | None = 0  # per-request seed = seed + prompt index


@pydantic_dataclass(config=_STRICT)
class DatasetConfig:
    source: str = "env"  # "hub" (qiaojin/PubMedQA via datasets), "env" ($SPECDEC_PUBMEDQA), or a file path
    hub_id: str = "qiaojin/PubMedQA"
    hub_config: str = "pqa_labeled"
    split: str = "train"
    num_prompts: int = Field(20, ge=1)
    seed: int | None = 0  # shuffle seed for picking prompts; None = file order
    max_prompt_tokens: int | None = Field(None, ge=16)  # None = the verifier's limit


@pydantic_dataclass(config=_STRICT)
class ConcurrencyConfig:
    draft_workers: int = Field(1, ge=1)  # Ray actors, each needing one `draft` resource
    sessions_per_worker: int = Field(1, ge=1)  # requests in flight per worker (when `sessions` is not set)
    # requests in flight in all, spread over the workers; a list sweeps it (every configuration at every level,
    # the same prompts); None = draft_workers x sessions_per_worker
    sessions: int | list[int] | None = None
    draft_threads: int | None = Field(None, ge=1)  # torch CPU threads per worker; None = its cores

    _sessions_range = _each_at_least("sessions", 1)

    def levels(self) -> list[int]:
        """The concurrency levels measured: total requests in flight."""
        if self.sessions is None:
            return [self.draft_workers * self.sessions_per_worker]
        return _as_list(self.sessions)


@pydantic_dataclass(config=_STRICT)
class LoadConfig:
    """Open-loop load (orchestrator/openloop.py): requests arrive by a seeded Poisson process at each rate."""

    arrival: Literal["poisson"] = "poisson"
    rates: float | list[float] = 1.0  # requests/s; a list sweeps it (every configuration at every rate)
    requests: int | None = Field(None, ge=1)  # arrivals per rate; None (and no duration_s) = dataset.num_prompts
    duration_s: float | None = Field(None, gt=0)  # or every arrival within this many seconds
    warmup: int = Field(0, ge=0)  # the first arrivals, excluded from the figures
    cooldown: int = Field(0, ge=0)  # the last arrivals, excluded from the figures
    seed: int = 0  # the same arrival times for every configuration at a rate

    _rates = _each("rates", lambda v: v > 0, "> 0 requests/s")

    def levels(self) -> list[float]:
        return [float(r) for r in _as_list(self.rates)]


@pydantic_dataclass(config=_STRICT)
class SloConfig:
    """Latency targets a request must meet to count towards goodput and capacity (orchestrator/serving.py)."""

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)


@pydantic_dataclass(config=_STRICT)
class CpusConfig:
    verifier: list[int]  # CPU ids the Ray-started verifier runs on (the baseline's too)
    draft: list[int]  # CPU ids every draft worker runs on


@pydantic_dataclass(config=_STRICT)
class PricesConfig:
    verifier_per_hour: float = Field(2.0, ge=0)  # USD/h of the GPU host (e.g. one rented H100)
    draft_per_hour: float = Field(0.0, ge=0)  # USD/h of a draft host (a laptop you own: 0)


@pydantic_dataclass(config=_STRICT)
class RayConfig:
    address: str | None = None  # None = start a local Ray; "auto" or ray://... = join a cluster
    num_cpus: int | None = None  # local Ray only; None = all of this machine's


@pydantic_dataclass(config=_STRICT)
class SecurityConfig:
    auth_token_file: str | None = None  # token for the verifier (default $SPECDEC_AUTH_TOKEN); a Ray-started one gets it too
    tls: bool = False  # dial the verifier over TLS (implied by tls_ca)
    tls_ca: str | None = None  # PEM CA that signed the verifier's certificate; None = system roots
    tls_server_name: str | None = None  # name expected in its certificate, if not the dialled host
    client_cert: str | None = None  # mutual TLS: this client's PEM certificate and key
    client_key: str | None = None
    server_cert: str | None = None  # a Ray-started verifier: its PEM certificate and key (paths on its node)
    server_key: str | None = None
    client_ca: str | None = None  # a Ray-started verifier: require client certificates signed by this CA
    insecure: bool = False  # let a Ray-started verifier listen on a cluster address without TLS and a token


@pydantic_dataclass(config=_STRICT)
class BenchConfig:
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    drafts: list[DraftConfig] = Field(default_factory=list)
    tokenizer: str | None = None  # tokenizer for prompts; None = the verifier's model id
    prompt_format: Literal["raw", "chat"] = "raw"  # chat: the PubMedQA prompt as a user message in the chat template
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    max_new_tokens: int = Field(64, ge=1)
    ignore_eos: bool = True  # generate exactly max_new_tokens, so every configuration does the same work
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    # emulated round trip of every draft without its own rtt_ms (--emulate-rtt-ms); a list sweeps it
    rtt_ms: float | list[float] = 0.0
    mode: str | list[str] = DEFAULT_MODE  # session mode of every draft without its own; a list sweeps it (--mode)
    prices: PricesConfig = Field(default_factory=PricesConfig)
    output_dir: str = "runs/pubmedqa"
    timeout_s: float = Field(600.0, gt=0)  # deadline of one request
    warmup: bool = True  # one short untimed request per worker before each configuration
    # grouped: each configuration runs all its prompts, then the next; interleaved: prompt by prompt, every
    # configuration in turn (warm-up before the first prompt only), so that drift in the machine's speed
    # (a shared VM's neighbours) hits every configuration alike: for fast steps, where it rivals the effect
    order: Literal["grouped", "interleaved"] = "grouped"
    ray: RayConfig = Field(default_factory=RayConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    # local runs emulate two machines: "auto" pins the verifier to the first half of this machine's cores and the
    # draft workers to the rest; "shared" lets every role use every core; or {verifier: [ids], draft: [ids]}
    cpus: Literal["auto", "shared"] | CpusConfig = "auto"
    # None: the closed loop (concurrency.sessions requests in flight); set: open-loop arrivals at load.rates,
    # concurrency.sessions (one level) being the draft slots they share
    load: LoadConfig | None = None
    slo: SloConfig = Field(default_factory=SloConfig)  # targets for goodput and capacity (serving.md)

    _rtt_range = _each_at_least("rtt_ms", 0)
    _modes = _each_mode("mode")

    def sampling_params(self, seed_offset: int, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        s = self.sampling
        return SamplingParams(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=self.max_new_tokens,
            seed=None if s.seed is None else s.seed + seed_offset,
            stop_token_ids=() if self.ignore_eos else stop_token_ids,
        )


@dataclass(frozen=True)
class RunSpec:
    """One measured configuration: the baseline, or one drafter at one gamma, one mode and one emulated RTT."""

    drafter: str  # "baseline" | "lm" | "ngram" | "suffix"
    draft_name: str = "verifier-only"
    model: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    gamma: Gamma = 0
    rtt_ms: float = 0.0
    ngram_max: int = 3
    dense_dtype: str = "fp16"
    sessions: int | None = None  # requests in flight, when the run sweeps concurrency
    backend: str = "transformers"  # LM drafters: transformers | llama.cpp
    mode: str = DEFAULT_MODE  # how the session overlaps drafting and verifying (specdec.config.SPEC_MODES)
    rate: float | None = None  # open-loop arrival rate (requests/s); None = the closed loop
    tree_nodes: int = 0  # token trees of this many nodes (DraftConfig.tree); 0 = chains

    @property
    def drafter_spec(self):
        """The draft_worker.drafters.DrafterSpec this configuration drafts with."""
        from draft_worker.drafters import DrafterSpec

        return DrafterSpec(kind=self.drafter, model=self.model, backend=self.backend, dtype=self.dtype,
                           device=self.device, dense_dtype=self.dense_dtype, ngram_max=self.ngram_max,
                           tree_nodes=self.tree_nodes)

    @property
    def name(self) -> str:
        name = "baseline" if self.drafter == "baseline" else f"{self.draft_name} g={self.gamma}"
        name += f" tree={self.tree_nodes}" if self.tree_nodes else ""
        name += f" {self.mode}" if self.mode != DEFAULT_MODE else ""  # the default mode goes unnamed
        name += f" rtt={self.rtt_ms:g}ms" if self.rtt_ms else ""
        return name + (f" x{self.sessions}" if self.sessions else "") + (f" @{self.rate:g}/s" if self.rate else "")


def expand(config: BenchConfig) -> list[RunSpec]:
    """Every configuration to measure, in config order, the baseline first at each concurrency level: once per
    emulated RTT that any draft configuration uses, so each one has verifier-only generation at its own RTT."""
    swept = config.concurrency.sessions is not None
    if any(d.backend == "llama.cpp" for d in config.drafts) and max(config.concurrency.levels()) > config.concurrency.draft_workers:
        raise ConfigError("a llama.cpp draft runs one session at a time per draft worker: keep concurrency.sessions "
                          "(or draft_workers x sessions_per_worker) at most draft_workers")

    def rtts(d: DraftConfig) -> list[float]:
        return [float(r) for r in _as_list(d.rtt_ms if d.rtt_ms is not None else config.rtt_ms)]

    if config.load is not None and len(config.concurrency.levels()) > 1:
        raise ConfigError("load: an open-loop run sweeps arrival rates; give concurrency.sessions one value (its draft slots)")
    levels = [(None, rate) for rate in config.load.levels()] if config.load else [
        (sessions if swept else None, None) for sessions in config.concurrency.levels()]
    specs = []
    for level, rate in levels:
        specs += [RunSpec("baseline", rtt_ms=rtt, sessions=level, rate=rate) for rtt in sorted({r for d in config.drafts for r in rtts(d)})]
        for d in config.drafts:
            for rtt in rtts(d):
                for gamma in _as_list(d.gamma):
                    for mode in _as_list(d.mode if d.mode is not None else config.mode):
                        specs.append(RunSpec(d.kind, d.name, d.model, d.dtype, d.device, gamma, rtt, d.ngram_max,
                                             d.dense_dtype, level, d.backend, mode, rate,
                                             d.tree.max_nodes if d.tree else 0))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two configurations share a name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    return specs


def _format(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("int", "str", "list["))) or exc.title
        msg = "unknown key" if err["type"] == "unexpected_keyword_argument" or err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def from_dict(data: dict) -> BenchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        config = BenchConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    except TypeError as exc:  # an unknown top-level key
        raise ConfigError(str(exc)) from None
    for d in config.drafts:
        if d.kind == "lm" and not d.model:
            raise ConfigError(f"drafts.{d.name}: an lm drafter needs a model")
    if not config.drafts:
        raise ConfigError("drafts: list at least one draft configuration")
    sec = config.security
    if bool(sec.server_cert) != bool(sec.server_key):
        raise ConfigError("security: server_cert and server_key go together")
    if sec.server_cert and not (sec.tls or sec.tls_ca):
        raise ConfigError("security.server_cert makes the verifier speak TLS: set security.tls_ca (or tls: true) for the clients")
    if config.verifier.address is not None:
        from draft_worker.router import parse_addresses

        try:
            parse_addresses(config.verifier.address)
        except ValueError as exc:
            raise ConfigError(f"verifier.address: {exc}") from None
        if config.verifier.replicas > 1:
            raise ConfigError("verifier.replicas starts a Ray pool; with verifier.address list the running replicas instead")
    expand(config)  # names must be unique
    return config


def load(path: str | pathlib.Path | None) -> BenchConfig:
    """The config at `path`, or the embedded default when None."""
    if path is None:
        return from_dict(yaml.safe_load(DEFAULT_YAML))
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return from_dict(data or {})


def override(config: BenchConfig, **changes) -> BenchConfig:
    """Apply CLI overrides (None = keep); nested ones as 'section.key'."""
    data: dict = {}
    for key, value in changes.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    for section, fields in list(data.items()):
        if isinstance(fields, dict):
            try:
                data[section] = replace(getattr(config, section), **fields)
            except ValidationError as exc:
                raise ConfigError(f"{section}.{_format(exc)}") from None
    try:
        return replace(config, **data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


DEFAULT_YAML = """
verifier: {model: "offline:qwen2.5-coder-1.5b-instruct", dtype: bf16, device: auto}
drafts:
  - {name: qwen-0.5b, kind: lm, model: "offline:qwen2.5-coder-0.5b-instruct", dtype: bf16, gamma: [1, 2, 3, 4, adaptive]}
  - {name: ngram, kind: ngram, gamma: 4}
max_new_tokens: 64
dataset: {source: env, num_prompts: 20}
"""
