"""`specdec serve-verifier` (also `python -m verifier_worker.serve`): load the model and serve it over gRPC.

The verifier's whole command line lives here, so a GPU box runs it without the benchmark's packages
(Ray, pandas, plots). It prints `listening on HOST:PORT` once it serves; launchers wait for that line.
SIGTERM or SIGINT drains it (`server.drain`): health turns NOT_SERVING, new sessions get UNAVAILABLE, the
sessions in flight have --drain-timeout seconds to finish, and the process exits 0 without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from specdec.config import VerifierLimits
from specdec.errors import UserError, run_command, user_errors
from verifier_worker.launched import apply_launcher_env

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id, local folder, .gguf file, or an offline: alias")
    p.add_argument("--backend", default="transformers", choices=("transformers", "llama.cpp"),
                   help="the model runtime: transformers (torch, --dtype/--device) or llama.cpp (a .gguf file or "
                        "offline: alias, run as quantized; needs the llamacpp extra)")
    p.add_argument("--threads", type=int, help="llama.cpp: decoding threads (default: the cores this process may use)")
    p.add_argument("--n-ctx", type=int, default=8192,
                   help="llama.cpp: KV cells shared by all open sessions, prompts and outputs (default 8192)")
    p.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"),
                   help="llama.cpp: fused attention (default auto: on where the build supports it)")
    p.add_argument("--dtype", default="auto",
                   help="fp32 | bf16 | fp16 | auto (default auto: bf16 where the hardware runs it natively, CUDA or a "
                        "CPU with AMX/AVX512-bf16; fp32 elsewhere; the choice is printed)")
    p.add_argument("--device", default="auto", help="cpu | cuda[:N] | mps | auto (default auto)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 binds a free port (the real one is printed)")
    defaults = VerifierLimits()
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port)")
    p.add_argument("--max-gamma", type=int, default=defaults.max_gamma)
    p.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    p.add_argument("--max-message-mb", type=int, default=0,
                   help="largest request in MiB (default 0: what the model needs, max_gamma x vocab x 4 bytes + headroom)")
    p.add_argument("--max-sessions-per-client", type=int, default=defaults.max_sessions_per_client)
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s, help="close a session idle this many seconds")
    p.add_argument("--max-batch-tokens", type=int, default=defaults.max_batch_tokens,
                   help="token budget of one batched engine step (sessions x longest row)")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_s * 1000,
                   help="most a step waits for the last step's lock-step sessions to send their next block "
                        "(never more than a quarter of a step; 0 = never wait)")
    p.add_argument("--tpot-slo-ms", type=float, default=defaults.tpot_slo_ms,
                   help="draft budget: keep each session's expected verifier ms per token under this when a smaller "
                        "budget can (0 = no target; a client may send its own)")
    p.add_argument("--draft-min-gain", type=float, default=defaults.draft_min_gain,
                   help="draft budget: grant drafts only when the model expects them to raise goodput by at least this "
                        "fraction over granting none (e.g. 0.05)")
    p.add_argument("--no-draft-budget", dest="draft_budget", action="store_false",
                   help="grant no draft budgets: verify every draft token a client sends (fixed-gamma experiments)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="draft budget: skip timing steps of a few block sizes before serving (verifier_worker/warmup.py); "
                        "the first grants are then priced from prompt and decoding steps alone")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the sessions in flight get to finish before they are cut (default 30)")
    sec = p.add_argument_group("security (required to listen on anything but loopback)")
    sec.add_argument("--tls-cert", help="PEM certificate chain of this server (see `specdec make-certs`)")
    sec.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sec.add_argument("--tls-client-ca", help="require client certificates signed by this PEM CA (mutual TLS)")
    sec.add_argument("--auth-token-file", help="clients must send this token (default: $SPECDEC_AUTH_TOKEN)")
    sec.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS and a token")


async def serve(args: argparse.Namespace) -> None:
    from specdec import models
    from verifier_worker.listen import drain, start_server
    from verifier_worker.server import ModelInfo, VerifierServicer

    limits = VerifierLimits(
        max_gamma=args.max_gamma,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        max_sessions=args.max_sessions,
        max_message_bytes=args.max_message_mb * 2**20,
        max_sessions_per_client=args.max_sessions_per_client,
        idle_timeout_s=args.idle_timeout,
        max_batch_tokens=args.max_batch_tokens,
        batch_wait_s=args.batch_wait_ms / 1000,
        draft_budget=args.draft_budget,
        tpot_slo_ms=args.tpot_slo_ms,
        draft_min_gain=args.draft_min_gain,
    )
    with user_errors("invalid limits", ValueError):
        limits.validate()
    credentials, token = _server_security(args)
    if args.backend == "llama.cpp":
        model, info = _load_llamacpp(args, limits)
    else:
        dtype, device = models.load_dtype_device(args.dtype, args.device)
        print(f"dtype {str(dtype).removeprefix('torch.')} on {device}" + (" (--dtype auto)" if args.dtype.strip().lower() == "auto" else ""),
              flush=True)
        with user_errors(f"cannot load {args.model!r}"):
            tokenizer = models.load_tokenizer(args.model)
            model = models.load_model(args.model, dtype=dtype, device=device)
        info = ModelInfo(
            model_id=args.model,
            vocab_size=models.model_vocab_size(model),
            tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
        )
    with user_errors(f"cannot serve {args.model!r}", ValueError):  # e.g. attention the engine cannot batch
        servicer = VerifierServicer(model, info, limits)
    if servicer.budgeter is not None and args.warmup:
        from verifier_worker.warmup import time_blocks
        started = time.perf_counter()
        costs = await time_blocks(servicer.engine, info.vocab_size)
        print(f"warm-up ({time.perf_counter() - started:.1f} s), step cost for the draft budget: "
              + ", ".join(f"{n} token{'s' * (n > 1)} {1000 * s:.0f} ms" for n, s in costs.items()), flush=True)
    with user_errors(f"cannot listen on {args.host}:{args.port}", OSError, RuntimeError):
        server, port = await start_server(servicer, args.host, args.port, credentials, token)
    if args.metrics_port is not None:
        with user_errors(f"cannot serve metrics on {args.host}:{args.metrics_port}", OSError):
            metrics_port = _serve_metrics(servicer, args.host, args.metrics_port)
        print(f"metrics on http://{args.host}:{metrics_port}/metrics", flush=True)
    print(f"listening on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.warning("shutting down: draining %d session(s) for up to %g s", servicer.active_sessions, args.drain_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second signal ends the process at once
    cut = await drain(server, servicer, args.drain_timeout)
    print(f"stopped ({cut} session(s) cut at the drain timeout)", flush=True)


def _load_llamacpp(args: argparse.Namespace, limits: VerifierLimits):
    """(LlamaCppBackend, ModelInfo) for a GGUF; the tokenizer fingerprint is the GGUF's own tokenizer's."""
    from specdec import models
    from verifier_worker.llamacpp_backend import LlamaCppBackend, LlamaCppConfig, import_llama_cpp
    from verifier_worker.server import ModelInfo

    with user_errors("--backend llama.cpp", ImportError):
        lc = import_llama_cpp()
    config = LlamaCppConfig(n_ctx=args.n_ctx, n_seq_max=min(256, limits.max_sessions),
                            n_batch=max(512, limits.max_batch_tokens), n_threads=args.threads,
                            flash_attn=getattr(args, "flash_attn", "auto"))
    with user_errors(f"cannot load {args.model!r} into llama.cpp"):
        backend = LlamaCppBackend(args.model, config)
        tokenizer = models.load_tokenizer(str(models.gguf_path(args.model)))  # the tokenizer inside the GGUF
    info = ModelInfo(
        model_id=args.model,
        vocab_size=backend.vocab_size,
        tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        dtype=f"gguf {backend.description}",  # e.g. "qwen2 1.5B Q4_K - Medium"
        device="llama.cpp " + ("gpu" if lc.llama_supports_gpu_offload() else "cpu"),
    )
    return backend, info


def _serve_metrics(servicer, host: str, port: int) -> int:
    """prometheus_client's HTTP server (its own thread) over the servicer's registry. -> the bound port"""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=servicer.metrics.registry)
    return server.server_port


def _server_security(args):
    """(TLS credentials or None, token or None); refuses an exposed address without both, unless --insecure."""
    from specdec import tls
    from verifier_worker.auth import server_credentials

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("pass --tls-cert and --tls-key together")
    with user_errors("cannot read the TLS/token files", OSError, ValueError):
        token = tls.read_token(args.auth_token_file)
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if not tls.is_loopback(args.host) and not (credentials and token):
        if not args.insecure:
            raise UserError(
                f"refusing to listen on {args.host} without TLS and an auth token: pass --tls-cert/--tls-key and "
                "--auth-token-file (make them with `specdec make-certs --host HOST --token`), bind 127.0.0.1 behind "
                "an SSH tunnel, or pass --insecure to accept the risk"
            )
        log.warning("listening on %s with%s TLS and with%s an auth token (--insecure): anyone who can reach "
                    "this port can use the verifier", args.host, "" if credentials else "out", "" if token else "out")
    return credentials, token


def main(argv: list[str] | None = None) -> int:
    apply_launcher_env()  # started by orchestrator/launch.py: its cores, and exit with it
    parser = argparse.ArgumentParser(prog="specdec serve-verifier", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: asyncio.run(serve(args)), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
