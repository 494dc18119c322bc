"""The `specdec` command: serve a verifier, generate through one, benchmark, and re-render a report.

Argument parsing and printing only; the work happens in verifier_worker, draft_worker and specdec.
A user error ends with one line on stderr and a non-zero exit code, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys

from specdec.config import DEFAULT_MODE, SPEC_MODES
from specdec.errors import LOAD_ERRORS, UserError, run_command, user_errors


def _add_serve(sub) -> None:
    from verifier_worker import serve

    serve.add_arguments(sub.add_parser("serve-verifier", help="load the verifier model and serve it over gRPC"))


def _add_drafting(p, baseline: bool) -> None:
    """The flags `generate` and `serve-draft` share: which verifier, which drafter, how it drafts, security."""
    p.add_argument("--verifier", required=True, action="append", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the verifier, or several replicas (comma-separated or the flag repeated): each request goes "
                        "to the least-loaded healthy one and moves to another only if its replica goes away")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--draft", metavar="MODEL", help="LM drafter: Hub id, folder, .gguf or offline: alias")
    mode.add_argument("--drafter", choices=["ngram", "suffix"], help="a drafter that needs no model: ngram (prompt "
                      "lookup) or suffix (suffix decoding over the prompt, the output and earlier outputs)")
    if baseline:
        mode.add_argument("--baseline", action="store_true", help="verifier-only generation")
    p.add_argument("--tokenizer", help="tokenizer source for --drafter ngram/--baseline (default: the verifier's model id)")
    p.add_argument("--gamma", type=_gamma, default="auto", help="'auto' (the default: rtt's choice within the "
                   "draft budget the verifier grants from its load), draft tokens per block (an integer, for "
                   "experiments), 'adaptive' (HF's +2/-1) or 'rtt' (chosen per round from the measured round trip "
                   "and step times); every gamma obeys the verifier's budget")
    p.add_argument("--tpot-slo-ms", type=float, default=0.0, help="with --gamma auto: ask the verifier to keep this "
                   "request's verifier ms per token under this target when a smaller draft budget can (0: none)")
    p.add_argument("--mode", choices=SPEC_MODES, default=DEFAULT_MODE,
                   help=f"{DEFAULT_MODE} is the default. lockstep (least verifier compute): one block in flight; "
                        "ahead: lock-step, drafting the next block while a verdict is in flight; async (for a fast "
                        "verifier behind a long link: stays near verifier-only speed over any link): the verifier "
                        "decodes every step and verifies whatever draft has arrived. --gamma applies in every mode")
    p.add_argument("--ngram-max", type=int, default=3, help="longest n-gram the ngram drafter matches")
    p.add_argument("--suffix-cache-tokens", type=int, default=16384,
                   help="suffix drafter: tokens of earlier outputs this process keeps for matching (0 = none)")
    p.add_argument("--suffix-min-prob", type=float, default=0.1,
                   help="suffix drafter: stop a draft where the product of its frequencies falls below this")
    p.add_argument("--tree-nodes", type=int, default=0,
                   help="lm and suffix drafters: propose token trees of at most N nodes (lockstep mode only; 0 = chains)")
    p.add_argument("--draft-backend", choices=["transformers", "llama.cpp"], default="transformers",
                   help="run the --draft model in transformers, or in llama.cpp (a .gguf file or offline: alias)")
    p.add_argument("--draft-dtype", default="auto",
                   help="transformers backend: auto (bf16 where the CPU runs it natively, else fp32) | fp32 | bf16")
    p.add_argument("--draft-device", default="cpu", help="transformers backend only")
    p.add_argument("--dense-dtype", choices=["fp16", "fp32"], default="fp16", help="wire dtype of full-vocab draft probs")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds for the whole request")
    _add_client_security(p)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text through a running verifier")
    _add_drafting(p, baseline=True)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--prompt-file", type=pathlib.Path)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line (no streamed text)")


def _add_serve_draft(sub) -> None:
    p = sub.add_parser("serve-draft", help="an OpenAI-compatible HTTP endpoint that drafts here and verifies remotely")
    _add_drafting(p, baseline=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 binds a free port (the real one is printed)")


def _gamma(value: str) -> int | str:
    if value in ("adaptive", "rtt", "auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma is an integer, 'adaptive', 'rtt' or 'auto', got {value!r}") from None


def _add_client_security(p) -> None:
    p.add_argument("--reconnect-timeout", type=float, default=10.0, metavar="S",
                   help="how long a request keeps trying to reach a verifier that went away (default 10 s)")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    sec.add_argument("--tls-ca", help="TLS, trusting this PEM CA (e.g. ca.pem from `specdec make-certs`)")
    sec.add_argument("--tls-cert", help="client PEM certificate for mutual TLS")
    sec.add_argument("--tls-key", help="client PEM private key for mutual TLS")
    sec.add_argument("--tls-server-name", help="expected name in the server certificate, if not the dialled host")
    sec.add_argument("--auth-token-file", help="token to send (default: $SPECDEC_AUTH_TOKEN)")


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="check (or wait until) a verifier serves; exit 0 when it does")
    p.add_argument("--verifier", required=True, metavar="HOST:PORT")
    p.add_argument("--wait", type=float, default=0.0, help="keep trying for this many seconds (default: one try)")
    _add_client_security(p)


def _add_make_certs(sub) -> None:
    p = sub.add_parser("make-certs", help="make a self-signed CA, a server certificate for HOSTs, a client certificate")
    p.add_argument("--host", action="append", required=True, help="IP or DNS name clients dial (repeat for several)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("certs"))
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--token", action="store_true", help="also write a random auth token to token.txt")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the baseline and speculative configurations on PubMedQA over Ray")
    p.add_argument("--config", type=pathlib.Path, help="run config YAML (default: the embedded one; see configs/)")
    p.add_argument("--verifier", action="append", metavar="HOST:PORT[,HOST:PORT...]",
                   help="use running verifier replicas (comma-separated or repeated) instead of starting them")
    p.add_argument("--ray-address", help="join a Ray cluster ('auto', HOST:PORT or ray://...) instead of a local Ray")
    p.add_argument("--dataset", metavar="SOURCE", help="'hub', 'env' ($SPECDEC_PUBMEDQA) or a PubMedQA file path")
    p.add_argument("--prompts", type=int, help="number of PubMedQA prompts")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--emulate-rtt-ms", type=float, nargs="+", metavar="MS",
                   help="add this round trip (userspace delay, half each way) to every draft without its own; several sweep it")
    p.add_argument("--mode", choices=SPEC_MODES, nargs="+", help="session mode of every draft without its own "
                   "`mode` key; several sweep it")
    p.add_argument("--draft-workers", type=int, help="draft worker actors")
    p.add_argument("--sessions-per-worker", type=int, help="requests in flight per draft worker")
    p.add_argument("--sessions", type=int, nargs="+", metavar="N", help="requests in flight in all; several sweep it")
    p.add_argument("--cpus", choices=["auto", "shared"], help="pin verifier and drafts to disjoint cores (auto) or not")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished requests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="re-render tables and plots of a finished (or interrupted) bench run")
    p.add_argument("run_dir", type=pathlib.Path)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict capacity (users per verifier at an SLO) by simulation from a bench run's measurements")
    p.add_argument("--from", dest="run_dir", type=pathlib.Path, required=True, metavar="RUN_DIR", help="a `specdec bench` run folder")
    p.add_argument("--slo-tpot-ms", type=float, help="TPOT target (default: the run's slo)")
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT target (default: the run's slo)")
    p.add_argument("--rtt-ms", type=_floats, default=[0.0], help="round trips to plan for, comma-separated (e.g. 10,50,100)")
    p.add_argument("--step-costs", type=pathlib.Path, help="step times of another device: CSV tokens,step_ms or YAML "
                   "{step_ms: {tokens: ms}, prefill_ms: ms} (default: fitted to the run's engine steps)")
    p.add_argument("--slots", type=int, help="draft slots (default: the run's; 0 = each user drafts on their own machine)")
    p.add_argument("--requests", type=int, default=200, help="simulated arrivals per rate tried")
    p.add_argument("--seed", type=int, default=0)


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_serve_draft(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_plan(sub)
    _add_make_certs(sub)
    _add_health(sub)
    return parser


def client_config(args, timeout_s: float = 600.0):
    """ClientConfig from the client security flags (the files are read here); a verifier on a loopback address
    shares this machine's cores (ClientConfig.shared_cores)."""
    import dataclasses

    from draft_worker.router import parse_addresses
    from draft_worker.transport import load_client_config
    from specdec.tls import all_loopback

    with user_errors("cannot read the TLS/token files", OSError, ValueError):
        config = load_client_config(timeout_s=timeout_s, auth_token_file=args.auth_token_file, tls=args.tls,
                                    tls_ca=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key,
                                    tls_server_name=args.tls_server_name, reconnect_s=args.reconnect_timeout)
    with user_errors("--verifier", ValueError):
        addresses = parse_addresses(args.verifier)
    return dataclasses.replace(config, shared_cores=all_loopback(addresses))


def _drafter_spec(args):
    """The DrafterSpec of --draft / --drafter ngram|suffix, or None for --baseline (a bad dtype/device is one line)."""
    from draft_worker.drafters import DrafterSpec
    from specdec.models import load_dtype_device

    if getattr(args, "baseline", False):
        return None
    if args.draft:
        load_dtype_device(args.draft_dtype, args.draft_device)  # a bad name is a one-line error, not a load failure
    return DrafterSpec(kind="lm" if args.draft else args.drafter, model=args.draft, backend=args.draft_backend,
                       dtype=args.draft_dtype, device=args.draft_device, dense_dtype=args.dense_dtype,
                       ngram_max=args.ngram_max, suffix_cache_tokens=args.suffix_cache_tokens,
                       suffix_min_prob=args.suffix_min_prob, tree_nodes=args.tree_nodes)


def verifier_router(args, config):
    """A router.Router over the --verifier replicas (enter it with `async with`); a bad address is one line."""
    from draft_worker.router import Router, parse_addresses

    with user_errors("--verifier", ValueError):
        return Router(parse_addresses(args.verifier), config)


async def connect_or_explain(router, spec, config, args):
    """draft_worker.service.connect with the drafting flags in args, its failures as one line: unreachable, a model
    that does not load, a mismatch."""
    from draft_worker.service import connect
    from draft_worker.transport import VerifierError

    try:
        return await connect(router, spec, config, args.gamma, args.tokenizer, args.mode, args.tpot_slo_ms)
    except VerifierError as exc:
        address = ",".join(router.addresses)
        raise UserError(f"cannot reach the verifier at {address}: {exc}" if exc.code else str(exc)) from exc
    except LOAD_ERRORS as exc:
        raise UserError(f"cannot load {(spec and spec.model) or args.tokenizer or 'the verifier tokenizer'!r}: {exc}") from exc


async def _generate(args) -> dict:
    from draft_worker import transport
    from specdec.text import TextStream, encode_prompt

    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    config = client_config(args, args.timeout)
    spec = _drafter_spec(args)
    async with verifier_router(args, config) as router:
        service = await connect_or_explain(router, spec, config, args)
        with user_errors("invalid request", ValueError):
            params = service.params(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                    args.ignore_eos)
            prompt_ids = encode_prompt(service.tokenizer, prompt, [{"role": "user", "content": prompt}] if args.chat else None)
        text = TextStream(service.tokenizer)

        def show(ids: list[int]) -> None:  # the terminal sees text as the verifier commits it
            if not args.json:
                print(text.push(ids), end="", flush=True)

        with user_errors("generation failed", transport.VerifierError, ValueError):
            result = await service.run(prompt_ids, params, show)
    if not args.json:
        print(text.finish(), flush=True)
    result.text = service.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return result.to_dict()


async def _serve_draft(args) -> None:
    from draft_worker import http
    from specdec.tls import is_loopback

    if not is_loopback(args.host):
        logging.getLogger("specdec").warning("serve-draft on %s: the HTTP endpoint has no authentication; anyone who "
                                             "can reach it can generate through your verifier", args.host)
    config = client_config(args, args.timeout)
    async with verifier_router(args, config) as router:
        service = await connect_or_explain(router, _drafter_spec(args), config, args)
        with user_errors(f"cannot listen on {args.host}:{args.port}", OSError):
            await http.serve(service, args.host, args.port)


def _read_prompt(path: pathlib.Path) -> str:
    with user_errors("cannot read the prompt file", OSError):
        return path.read_text()


def _sweep(values: list | None):
    """A repeatable flag as a config value: None (not given), one value, or a list of several (a sweep)."""
    return values and (values if len(values) > 1 else values[0])


def _bench(args) -> dict:
    from orchestrator import bench, report
    from orchestrator import config as bench_config

    try:
        cfg = bench_config.load(args.config)
        cfg = bench_config.override(cfg, **{
            "verifier.address": _sweep(args.verifier), "ray.address": args.ray_address, "dataset.source": args.dataset,
            "dataset.num_prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rtt_ms": _sweep(args.emulate_rtt_ms),
            "mode": _sweep(args.mode),
            "concurrency.draft_workers": args.draft_workers, "concurrency.sessions_per_worker": args.sessions_per_worker,
            "concurrency.sessions": _sweep(args.sessions),
            "cpus": args.cpus, "output_dir": args.out})
        run_dir = asyncio.run(bench.run(cfg, resume=args.resume, progress=not args.no_progress))
    except (bench_config.ConfigError, bench.BenchError) as exc:
        raise UserError(str(exc)) from exc
    summary = _report(run_dir)
    failed, total = report.failed_requests(run_dir / bench.REQUESTS)
    if failed:  # the results are on disk and reported; the exit code says the run is not whole
        print(json.dumps(summary, separators=(",", ":")))
        raise UserError(f"{failed} of {total} requests failed (their errors are in {run_dir / bench.REQUESTS}); "
                        "rerun with --resume to retry them")
    return summary


def _make_certs(args) -> None:
    from specdec import tls

    with user_errors("cannot make certificates", OSError, ValueError):
        paths = tls.make_certs(args.out, args.host, args.days, token=args.token)
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}/ (keys and token are mode 600)")
    print(f"verifier: specdec serve-verifier --host 0.0.0.0 --tls-cert {paths['server']} --tls-key {paths['server_key']}"
          + (f" --auth-token-file {paths['token']}" if "token" in paths else " --auth-token-file TOKEN_FILE"))
    print(f"clients:  --tls-ca {paths['ca']}" + (f" --auth-token-file {paths['token']}" if "token" in paths else "")
          + f"   (mutual TLS: server --tls-client-ca {paths['ca']}, clients --tls-cert {paths['client']} --tls-key {paths['client_key']})")


def _report(run_dir: pathlib.Path) -> dict:
    from orchestrator import report

    if not (run_dir / "requests.jsonl").exists() or not (run_dir / "run.json").exists():
        raise UserError(f"{run_dir} is not a bench run folder (no requests.jsonl and run.json)")
    with user_errors(f"cannot report {run_dir}", ValueError):
        tables, summary = report.render(run_dir)
    print(tables)
    print(f"\nwrote {run_dir}/summary.md, summary.csv, summary.json and plots", file=sys.stderr)
    return summary


def _run(args) -> None:
    if args.command == "serve-verifier":
        from verifier_worker.serve import serve

        asyncio.run(serve(args))
    elif args.command == "generate":
        out = asyncio.run(_generate(args))  # streams the text to stdout unless --json
        summary = f"{out['new_tokens']} tokens in {out['wall_s']:.2f}s ({out['tokens_per_s']:.1f} tok/s), "
        summary += "verifier only" if args.baseline else (
            f"{out['rounds']} rounds, acceptance {out['acceptance_rate']:.2f}, "
            f"{out['mean_acceptance_length']:.2f} tokens/round, network {out['network_share']:.1%} of wall time")
        print(summary, file=sys.stderr)
        if args.json:
            print(json.dumps(out, separators=(",", ":")))
    elif args.command == "serve-draft":
        asyncio.run(_serve_draft(args))
    elif args.command == "make-certs":
        _make_certs(args)
    elif args.command == "health":
        from draft_worker.transport import wait_serving

        with user_errors(f"verifier at {args.verifier} is not serving", TimeoutError):
            asyncio.run(wait_serving(args.verifier, client_config(args, timeout_s=10), args.wait))
        print(f"{args.verifier} SERVING")
    elif args.command == "plan":
        from orchestrator import plan

        print(json.dumps(plan.command(args), separators=(",", ":")))
    elif args.command in ("bench", "report"):
        summary = _bench(args) if args.command == "bench" else _report(args.run_dir)
        print(json.dumps(summary, separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
