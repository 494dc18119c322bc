"""The benchmark driver: PubMedQA prompts -> Ray draft workers -> one verifier, every result on disk at once.

For each configuration (the verifier-only baseline first) the prompts go into a queue that every
worker's session slots drain, so an idle worker always takes the next prompt. A request whose verifier
goes away is re-opened by the client itself (draft_worker/recovery.py); one that still fails is retried
once more after a jittered backoff and then recorded as failed: nothing is dropped, and `specdec bench`
exits non-zero saying how many failed. Each result is appended to
`requests.jsonl` as it arrives (flushed), so a crash loses nothing and `--resume` skips what is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass

from orchestrator.checks import BenchError, check_limits, check_resume
from orchestrator.config import BenchConfig, RunSpec, expand
from orchestrator import pool
from orchestrator.placement import pin_cores, shares_cores

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # the first try and one retry
RETRY_BACKOFF_S = 2.0  # the retry waits a uniform draw in [0, this x 2^(attempt - 1)]
REQUESTS = "requests.jsonl"


@dataclass(frozen=True)
class Prompt:
    index: int
    pubid: str
    ids: list[int]
    truncated: bool
    final_decision: str = ""  # PubMedQA's label: yes | no | maybe


def load_items(config: BenchConfig) -> list:
    """The PubMedQA items this run uses (checked before Ray or any model starts)."""
    from specdec import pubmedqa

    ds = config.dataset
    try:
        if ds.source == "hub":
            items = pubmedqa.load_hub(ds.hub_id, ds.hub_config, ds.split)
        else:
            path = pubmedqa.default_path() if ds.source == "env" else pathlib.Path(ds.source)
            if path is None:
                raise FileNotFoundError(f"dataset.source is 'env' but ${pubmedqa.ENV_VAR} is not set; set it or pass --dataset PATH")
            items = pubmedqa.load_items(path)
        return pubmedqa.select(items, ds.num_prompts, ds.seed)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise BenchError(f"cannot load PubMedQA: {exc}") from None


def encode_prompts(items: list, tokenizer, max_prompt_tokens: int, prompt_format: str = "raw") -> list[Prompt]:
    """Token ids per item, the abstract cut where a prompt is over max_prompt_tokens; `chat` wraps each prompt
    as a user message in the tokenizer's chat template (the template's tokens count against the limit)."""
    from specdec import pubmedqa
    from specdec.text import chat_around

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head: list[int] = []
    tail: list[int] = []
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise BenchError("prompt_format: chat, but the prompt tokenizer has no chat template")
        head, tail = (tokenize(text) for text in chat_around(tokenizer))
    prompts = []
    for i, item in enumerate(items):
        ids, truncated = pubmedqa.encode(item, tokenize, max_prompt_tokens - len(head) - len(tail))
        prompts.append(Prompt(i, item.pubid, head + ids + tail, truncated, item.final_decision))
    return prompts


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError carries the worker's exception
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]


class _Writer:
    """Appends one JSON line per request and flushes it at once."""

    def __init__(self, path: pathlib.Path):
        from orchestrator.report import complete_lines

        if path.exists():  # a crash mid-write can leave a partial last line: drop it before appending
            whole = complete_lines(path)
            if len(whole) < path.stat().st_size:
                path.write_bytes(whole)
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


async def run_configuration(spec: RunSpec, prompts: list[Prompt], workers: list, config: BenchConfig,
                            fingerprint: str, stop_ids: tuple[int, ...], tokenizer, writer: _Writer,
                            progress: bool = True, warmup: bool = True) -> None:
    import ray
    from tqdm import tqdm

    from draft_worker.transport import Backoff
    from orchestrator.workers import Job
    from specdec.pubmedqa import parse_decision

    def job(prompt: Prompt, max_new_tokens: int | None = None) -> Job:
        params = config.sampling_params(prompt.index, stop_ids)
        if max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=min(max_new_tokens, params.max_new_tokens))
        return Job(spec, prompt.ids, params, fingerprint)

    def record(prompt: Prompt, status: str, attempts: int, result: dict | None = None, error: str = "",
               timing: dict | None = None) -> None:
        rec = {**(timing or {}), "config": spec.name, "drafter": spec.drafter, "draft_name": spec.draft_name, "draft_model": spec.model,
               "gamma": spec.gamma, "mode": spec.mode, "rtt_ms": spec.rtt_ms, "sessions": sessions, "rate": spec.rate, "prompt_index": prompt.index, "pubid": prompt.pubid,
               "prompt_tokens": len(prompt.ids), "prompt_truncated": prompt.truncated, "status": status,
               "attempts": attempts, "error": error}
        if result is not None:
            result["text"] = tokenizer.decode(result["token_ids"], skip_special_tokens=True)
            decision = parse_decision(result["text"])
            result.update(decision=decision, final_decision=prompt.final_decision,
                          correct=decision is not None and decision == prompt.final_decision)
            rec.update(result)
        writer.write(rec)

    sessions = spec.sessions or config.concurrency.levels()[0]  # requests in flight
    deadline = config.timeout_s + 120  # the client's own deadline fires first; this catches a hung actor
    if config.warmup and warmup and prompts:
        try:
            await asyncio.gather(*(asyncio.wait_for(w.run.remote(job(prompts[0], 8)), deadline) for w in workers))
        except Exception as exc:  # noqa: BLE001 - the configuration cannot run: record every prompt as failed
            log.error("%s: warm-up failed: %s", spec.name, _error_text(exc))
            for prompt in prompts:
                record(prompt, "failed", 0, error=f"warm-up failed: {_error_text(exc)}")
            return

    async def call(worker, prompt: Prompt) -> dict:
        ref = worker.run.remote(job(prompt))
        try:
            return await asyncio.wait_for(ref, deadline)
        except asyncio.TimeoutError:
            ray.cancel(ref)  # stop the hung request on the worker too
            raise TimeoutError(f"no answer from the draft worker within {deadline:g} s") from None

    slots = [workers[i % len(workers)] for i in range(sessions)]  # round-robin over workers
    if spec.rate is not None:  # open loop: seeded Poisson arrivals share the slots; failures are not retried
        from orchestrator import openloop

        times = openloop.arrivals(config.load, spec.rate, len(prompts))
        with tqdm(total=len(times), desc=spec.name, unit="req", file=sys.stderr, disable=not progress) as bar:
            def done(i, prompt, result, error, timing) -> None:
                record(prompt, "failed" if error else "ok", 1, result, _error_text(error) if error else "", timing)
                bar.update(1)

            await openloop.drive(times, prompts, slots, call, done)
        return

    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait((prompt, 1))
    bar = tqdm(total=len(prompts), desc=spec.name, unit="prompt", file=sys.stderr, disable=not progress, leave=True)
    totals = {"tokens": 0, "wall": 0.0, "proposed": 0, "accepted": 0, "failed": 0}

    async def slot(worker) -> None:
        while not queue.empty():
            prompt, attempt = queue.get_nowait()
            try:
                result = await call(worker, prompt)
            except Exception as exc:  # noqa: BLE001 - counted and recorded, never fatal
                if attempt < MAX_ATTEMPTS:
                    delay = Backoff(initial_s=RETRY_BACKOFF_S, max_s=8 * RETRY_BACKOFF_S).delay(attempt - 1)
                    log.warning("%s: prompt %s failed (%s); retrying in %.1f s", spec.name, prompt.pubid,
                                _error_text(exc), delay)
                    await asyncio.sleep(delay)  # this slot backs off; the others keep draining the queue
                    queue.put_nowait((prompt, attempt + 1))
                    continue
                record(prompt, "failed", attempt, error=_error_text(exc))
                totals["failed"] += 1
            else:
                record(prompt, "ok", attempt, result)
                totals["tokens"] += result["new_tokens"]
                totals["wall"] += result["wall_s"]
                totals["proposed"] += result["proposed"]
                totals["accepted"] += result["accepted"]
            bar.update(1)
            postfix = {"tok/s": f"{totals['tokens'] / max(totals['wall'], 1e-9):.1f}", "failed": totals["failed"]}
            if totals["proposed"]:
                postfix["acc"] = f"{totals['accepted'] / totals['proposed']:.2f}"
            bar.set_postfix(postfix)

    try:
        await asyncio.gather(*(slot(worker) for worker in slots))
    finally:
        bar.close()


def _init_ray(config: BenchConfig) -> bool:
    """Start or join Ray; True when this process started it (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        if config.ray.address:
            ray.init(address=config.ray.address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False,
                     resources={"draft": config.concurrency.draft_workers, "verifier": config.verifier.replicas})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BenchError(f"cannot start or join Ray ({config.ray.address or 'local'}): {exc}") from None
    return True


def _client_config(config: BenchConfig):
    """The draft side's ClientConfig: the token and PEM files are read here, on the driver."""
    from draft_worker.transport import load_client_config

    sec = config.security
    try:
        return load_client_config(timeout_s=config.timeout_s, auth_token_file=sec.auth_token_file, tls=sec.tls,
                                  tls_ca=sec.tls_ca, client_cert=sec.client_cert, client_key=sec.client_key,
                                  tls_server_name=sec.tls_server_name)
    except (OSError, ValueError) as exc:
        raise BenchError(f"security: {exc}") from None


def _server_args(config: BenchConfig) -> tuple[str, ...]:
    """serve-verifier flags for a Ray-started verifier (the token travels in its environment)."""
    sec = config.security
    args: list[str] = []
    for flag, value in (("--tls-cert", sec.server_cert), ("--tls-key", sec.server_key), ("--tls-client-ca", sec.client_ca)):
        if value:
            args += [flag, value]
    if not config.verifier.draft_budget:
        args.append("--no-draft-budget")
    return (*args, "--insecure") if sec.insecure else tuple(args)


def _need(resource: str, amount: float, hint: str) -> None:
    import ray

    have = ray.cluster_resources().get(resource, 0)
    if have < amount:
        raise BenchError(f"the Ray cluster offers {have:g} of the `{resource}` resource, this run needs {amount:g}; {hint}")


async def _start_verifier(config: BenchConfig, client_config, cpus: list[int] | None) -> tuple:
    """A VerifierActor on the node with the `verifier` resource; -> (actor, its HOST:PORT)."""
    from orchestrator.workers import VerifierActor

    v = config.verifier
    actor = VerifierActor.options(resources={"verifier": 1}, num_gpus=v.num_gpus).remote(
        v.model, v.dtype, v.device, local=config.ray.address is None, threads=v.threads,
        server_args=_server_args(config), token=client_config.auth_token, cpus=cpus)
    try:
        return actor, await actor.address.remote()
    except Exception as exc:  # noqa: BLE001 - the model failed to load, or the port to bind
        raise BenchError(f"cannot start the verifier: {_error_text(exc)}") from None


def _prompt_tokenizer(config: BenchConfig, info) -> tuple:
    """The tokenizer that encodes the prompts (the verifier's by default) and its fingerprint, checked
    against the verifier's. LM drafts are checked on the draft workers (`_prepare_drafts`)."""
    from draft_worker.transport import VerifierError, check_pair
    from specdec import models

    source = config.tokenizer or info.model_id
    try:
        try:
            tokenizer = models.load_tokenizer(source)
        except OSError as exc:
            raise OSError(f"{exc} (set `tokenizer:` in the config to a copy of the verifier's tokenizer)") from None
        fingerprint = models.tokenizer_fingerprint(tokenizer)
        check_pair(info, source, fingerprint)
    except (OSError, ValueError, VerifierError) as exc:
        raise BenchError(str(exc)) from None
    return tokenizer, fingerprint


async def _prepare_drafts(specs: list[RunSpec], workers: list) -> None:
    """Every worker loads every LM draft on its own node and checks its tokenizer, before any request."""
    lm_specs = list({(s.model, s.dtype, s.device): s for s in specs if s.drafter == "lm"}.values())
    try:
        await asyncio.gather(*(w.prepare.remote(s) for w in workers for s in lm_specs))
    except Exception as exc:  # noqa: BLE001 - a model that does not load, or does not share the tokenizer
        raise BenchError(f"draft model check failed: {_error_text(exc)}") from None


def schedule(specs: list[RunSpec], prompts: list[Prompt], done: set, order: str, complete: set = frozenset()):
    """-> (configuration, its prompts still to run, warm up first?) in the run's order (BenchConfig.order).
    An open-loop configuration (a rate) runs grouped, whole: its arrivals cannot resume half-way, so it is
    skipped only when it is in `complete` (openloop.complete_passes), never by its prompts: with more
    requests than prompts every prompt can have succeeded in a pass that stopped half-way."""
    if order == "grouped" or any(s.rate is not None for s in specs):
        for spec in specs:
            if spec.rate is not None:
                if spec.name not in complete:
                    yield spec, prompts, True
                continue
            todo = [p for p in prompts if (spec.name, p.pubid) not in done]
            if todo:
                yield spec, todo, True
        return
    warmed: set[str] = set()
    for prompt in prompts:
        for spec in specs:
            if (spec.name, prompt.pubid) not in done:
                yield spec, [prompt], spec.name not in warmed
                warmed.add(spec.name)


async def run(config: BenchConfig, resume: bool = False, progress: bool = True) -> pathlib.Path:
    """Run every configuration; returns the output folder (requests.jsonl and run.json in it)."""
    import ray

    from orchestrator.openloop import complete_passes
    from orchestrator.report import finished_keys, read_records
    from orchestrator.workers import DraftWorker

    out = pathlib.Path(config.output_dir)
    requests_path = out / REQUESTS
    if requests_path.exists() and not resume:
        raise BenchError(f"{out} already holds results; pass --resume to continue that run or --out for a new one")
    specs = expand(config)
    if resume:
        check_resume(out, config)
    items = load_items(config)
    client_config = _client_config(config)
    owns_ray = _init_ray(config)
    verifier_actors, workers, writer = [], [], None
    try:
        _need("draft", config.concurrency.draft_workers,
              "give draft nodes the resource (ray start --resources '{\"draft\": N}') or lower concurrency.draft_workers")
        try:
            verifier_cpus, draft_cpus = pin_cores(config)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if verifier_cpus:
            log.warning("cores: verifier %s, draft workers %s (cpus: shared turns pinning off)", verifier_cpus, draft_cpus)
        addresses = pool.configured(config)  # running replicas, or a pool of verifier.replicas started here
        if not addresses:
            verifier_actors, addresses = await pool.start(
                config, lambda cpus: _start_verifier(config, client_config, cpus), verifier_cpus)
        client_config = dataclasses.replace(client_config, shared_cores=shares_cores(config, verifier_cpus, addresses))
        info = await pool.info(addresses, client_config)
        check_limits(config, specs, info.limits)
        tokenizer, fingerprint = _prompt_tokenizer(config, info)
        limit = min(info.limits.max_prompt_tokens, config.dataset.max_prompt_tokens or info.limits.max_prompt_tokens)
        prompts = encode_prompts(items, tokenizer, limit, config.prompt_format)
        stop_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)

        n = config.concurrency.draft_workers
        workers = [DraftWorker.options(resources={"draft": 1}).remote(addresses, client_config, config.concurrency.draft_threads,
                                                                      draft_cpus) for _ in range(n)]
        await _prepare_drafts(specs, workers)
        out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "config": dataclasses.asdict(config), "configurations": [s.name for s in specs], "verifier_addresses": addresses,
            "verifier": {"model_id": info.model_id, "dtype": info.dtype, "device": info.device},
            "prompts": len(prompts), "prompts_truncated": sum(p.truncated for p in prompts),
            "cpus": {"verifier": verifier_cpus, "draft": draft_cpus},
            "workers": await asyncio.gather(*(w.where.remote() for w in workers)), "driver": platform.node(),
            "started_at": time.time(), "resumed": resume,
        }
        run_json = out / "run.json" if not (out / "run.json").exists() else out / f"run.resume-{int(time.time())}.json"
        run_json.write_text(json.dumps(run_info, indent=1))
        done = finished_keys(requests_path) if resume else set()
        complete = complete_passes(read_records(requests_path)) if resume and requests_path.exists() else set()
        writer = _Writer(requests_path)
        for spec, todo, warm in schedule(specs, prompts, done, config.order, complete):
            await run_configuration(spec, todo, workers, config, fingerprint, stop_ids, tokenizer, writer,
                                    progress and (config.order == "grouped" or spec.rate is not None), warm)
        return out
    finally:
        if writer is not None:
            writer.file.close()
        for w in workers:
            try:
                await asyncio.wait_for(w.close.remote(), 10)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        await pool.stop(verifier_actors)
        if owns_ray:
            ray.shutdown()
