"""The replica router over stub verifiers on 127.0.0.1:0: new sessions go to the least-loaded replica (as each
reports it in InfoReply.load), a session stays on its replica, and a draining, unhealthy or dead replica gets
no new session. Plus: a real verifier reports its open sessions."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from draft_worker.router import Router, parse_addresses
from draft_worker.transport import VerifierError, fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from tests.stubs import fake_pair


class LoadStub(pb_grpc.VerifierServicer):
    """Answers Info with whatever load the test sets."""

    def __init__(self, sessions: int = 0, queued_tokens: int = 0):
        self.load = pb.Load(sessions=sessions, queued_tokens=queued_tokens)

    async def Info(self, request, context):  # noqa: N802
        return pb.InfoReply(model_id="stub", vocab_size=32, tokenizer_fingerprint="fp", load=self.load)


@pytest.fixture
async def replicas():
    """async factory: await replicas(load, ...) -> [(stub servicer, health servicer, server, address)]"""
    servers = []

    async def factory(*loads: tuple[int, int]):
        out = []
        for sessions, queued in loads:
            server = grpc.aio.server()
            stub, health_servicer = LoadStub(sessions, queued), health.aio.HealthServicer()
            pb_grpc.add_VerifierServicer_to_server(stub, server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            servers.append(server)
            out.append((stub, health_servicer, server, f"127.0.0.1:{port}"))
        return out

    yield factory
    for server in servers:
        await server.stop(None)


def pool(replicas) -> Router:
    return Router([address for *_, address in replicas], poll_s=3600)  # polled by hand


async def picks(router: Router, n: int) -> list[str]:
    """Where n new sessions go (each held open, so it counts toward its replica's load)."""
    routes = [router.route() for _ in range(n)]
    return [await route.acquire() for route in routes]


async def test_new_sessions_go_to_the_least_loaded_replica(replicas):
    running = await replicas((5, 0), (1, 0), (3, 0))
    a, b, c = (address for *_, address in running)
    async with pool(running) as router:
        # b reports 1 session; the router counts what it sends until the next report: b, b (3), then b or c
        assert await picks(router, 2) == [b, b]
        assert set(await picks(router, 2)) == {b, c}
        running[0][0].load = pb.Load(sessions=0)  # a empties; the next poll sees it
        await router.poll()
        assert await picks(router, 1) == [a]


async def test_queued_tokens_break_ties_in_sessions(replicas):
    running = await replicas((2, 900), (2, 40), (2, 300))
    async with pool(running) as router:
        assert await picks(router, 1) == [running[1][3]]


async def test_a_session_stays_on_its_replica_while_it_is_healthy(replicas):
    running = await replicas((0, 0), (4, 0))
    a, b = (address for *_, address in running)
    async with pool(running) as router:
        route = router.route()
        assert await route.acquire() == a
        running[0][0].load = pb.Load(sessions=9)  # a is now the busier one
        await router.poll()
        route.release()  # an attempt that ended without its replica failing
        assert await route.acquire() == a  # the session does not move
        assert await picks(router, 1) == [b]  # but a new one goes to b
        route.release(failed=True)  # a went away: the re-open goes elsewhere
        assert await route.acquire() == b and route.tried == [a, a, b]


@pytest.mark.parametrize("how", ["health", "load", "stopped"])
async def test_a_draining_or_dead_replica_gets_no_new_session(replicas, how):
    running = await replicas((0, 0), (3, 0))
    (stub, health_servicer, server, a), (*_, b) = running
    async with pool(running) as router:
        if how == "health":
            await health_servicer.enter_graceful_shutdown()  # NOT_SERVING, as `serve-verifier` does on SIGTERM
        elif how == "load":
            stub.load = pb.Load(draining=True)
        else:
            await server.stop(None)
        await router.poll()
        assert await picks(router, 3) == [b, b, b]  # though a reports the least load
        assert router.snapshot()[0]["serving"] is False


async def test_no_serving_replica_is_an_error_naming_every_address(replicas):
    running = await replicas((0, 0), (0, 0))
    async with pool(running) as router:
        for _, health_servicer, *_ in running:
            await health_servicer.enter_graceful_shutdown()
        await router.poll()
        with pytest.raises(VerifierError) as err:
            await router.route().acquire()
    assert err.value.code == "UNAVAILABLE" and all(address in str(err.value) for *_, address in running)


def test_addresses_parse_from_commas_or_repeats():
    assert parse_addresses(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"] and parse_addresses(None) == []
    for bad in ("a", "a:x", ["a:1", "a:1"]):
        with pytest.raises(ValueError):
            parse_addresses(bad)


async def test_a_verifier_reports_its_open_sessions_as_load(start_verifier):
    _, target = fake_pair(32)
    verifier = await start_verifier(target, vocab_size=32)
    assert (await fetch_info(verifier.stub)).load == pb.Load()
    call = verifier.stub.Speculate(timeout=30)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2, 3],
                                                             params=pb.SamplingParams(max_new_tokens=8))))
    assert (await call.read()).HasField("opened")
    assert (await fetch_info(verifier.stub)).load.sessions == 1
    call.cancel()
