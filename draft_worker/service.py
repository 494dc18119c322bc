"""One draft side bound to a verifier pool (one replica or several, through one router.Router): the pool's
Info, the prompt tokenizer and the draft model, loaded once and shared by every request (`specdec generate`
makes one; `serve-draft` makes one for all its HTTP requests).

`connect` checks the pair (a shared tokenizer) before any request; `run` is one request through the single
session loop (draft_worker/loop.py), speculative or verifier-only, on the replica the router picks for it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from draft_worker import client
from draft_worker.drafters import AdaptiveGamma, DrafterSpec, DraftModels, build_drafter
from draft_worker.gamma import new_history
from draft_worker.router import Router
from draft_worker.transport import ClientConfig
from protos.specdec.v1 import specdec_pb2 as pb
from specdec.config import DEFAULT_MODE, SamplingParams
from specdec.metrics import GenerationResult

log = logging.getLogger(__name__)


@dataclass
class DraftService:
    router: Router  # the verifier replicas; each request gets a route (a sticky replica) from it
    info: pb.InfoReply
    tokenizer: object  # encodes prompts and decodes output (the draft's, or the verifier's for ngram/baseline)
    fingerprint: str  # of that tokenizer
    spec: DrafterSpec | None  # None: verifier-only
    gamma: int | str  # draft tokens per block, "adaptive", "rtt" or "auto"
    config: ClientConfig
    draft_models: DraftModels
    mode: str = DEFAULT_MODE  # how sessions overlap drafting and verifying (specdec.config.SPEC_MODES)
    tpot_slo_ms: float = 0.0  # gamma "auto": each request's latency target for the verifier's budget (0: none)
    history: object = field(default_factory=new_history)  # gamma "rtt"/"auto": the drafter's acceptance so far

    @property
    def model_name(self) -> str:
        return self.info.model_id

    def params(self, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, ignore_eos: bool = False) -> SamplingParams:
        """Sampling parameters stopping at the tokenizer's EOS; ValueError names what is out of range."""
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens,
                                stop_token_ids=() if ignore_eos or eos is None else (eos,))
        params.validate(self.info.limits.max_new_tokens)
        return params

    async def run(self, prompt_ids: list[int], params: SamplingParams, on_commit: client.OnCommit | None = None,
                  result: GenerationResult | None = None) -> GenerationResult:
        """One request (VerifierError on a refusal, ValueError on a bad gamma); `result`: an empty one to fill."""
        route = self.router.route()
        if self.spec is None:
            return await client.generate_baseline(route, prompt_ids, params, self.config, on_commit, result)
        drafter = build_drafter(self.spec, self.draft_models, prompt_fingerprint=self.fingerprint)
        return await client.speculate(route, drafter, prompt_ids, params, gamma_schedule(self.gamma, self.tpot_slo_ms, self.history), self.info,
                                      self.config, drafter.fingerprint, on_commit, mode=self.mode, result=result)


def gamma_schedule(gamma: int | str, tpot_slo_ms: float = 0.0, history=None):
    """What client.speculate takes for a configured gamma: a fixed block size, or a fresh schedule per request
    ("adaptive": HF's +2/-1 heuristic; "rtt": chosen per round from the measured link and step times; "auto":
    rtt's choice within the verifier's draft budget, with an optional per-request latency target). history: the
    drafter's acceptance over earlier requests (draft_worker.gamma.new_history), which rtt/auto start from."""
    if gamma == "adaptive":
        return AdaptiveGamma()
    if gamma == "rtt":
        from draft_worker.gamma import RttGamma

        return RttGamma(history=history)
    if gamma == "auto":
        from draft_worker.gamma import AutoGamma

        return AutoGamma(tpot_slo_ms=tpot_slo_ms, history=history)
    return int(gamma)


async def connect(router: Router, spec: DrafterSpec | None, config: ClientConfig, gamma: int | str = 4,
                  tokenizer_source: str | None = None, mode: str = DEFAULT_MODE, tpot_slo_ms: float = 0.0) -> DraftService:
    """Fetch the pool's Info, load the draft model (off the event loop) and the prompt tokenizer, and check
    they share the verifier's tokenizer (every replica's). Raises VerifierError (unreachable, mismatch) or a
    load error."""
    from specdec import models

    info = await router.info()
    draft_models = DraftModels()
    if spec is not None and spec.kind == "lm":
        source = spec.model
        tokenizer = (await asyncio.to_thread(draft_models.load, spec)).tokenizer
    else:
        source = tokenizer_source or info.model_id
        tokenizer = await asyncio.to_thread(models.load_tokenizer, source)
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    await router.info(source, fingerprint)
    return DraftService(router, info, tokenizer, fingerprint, spec, gamma, config, draft_models, mode, tpot_slo_ms)
