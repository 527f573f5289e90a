"""``grpc_health_check`` against grpcio's own health servicer."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proxy.policy.values import Target
from proxy.upstream.grpc_health import check_request, grpc_health_check, response_status
from proxy.upstream.h2pool import H2Pool
from tests.support.sidecar import free_port


def test_messages_match_protobufs_encoding() -> None:
    assert check_request("svc") == health_pb2.HealthCheckRequest(service="svc").SerializeToString()
    assert check_request("") == b""
    for status in (0, 1, 2, 3):
        assert response_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == status


async def test_health_check_against_grpcio_servicer() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    pool = H2Pool(Target("http", "127.0.0.1", port), None, connect_timeout=2)
    try:
        assert await grpc_health_check(pool, "up", 2) is None
        assert await grpc_health_check(pool, "", 2) is None
        assert await grpc_health_check(pool, "down", 2) == "NOT_SERVING"
        reason = await grpc_health_check(pool, "nobody", 2)
        assert reason is not None and reason.startswith("grpc-status 5")
        assert len(pool.connections) == 1
    finally:
        await asyncio.wait_for(pool.aclose(), 5)
        await server.stop(None)


async def test_health_check_of_a_closed_port_says_why() -> None:
    pool = H2Pool(Target("http", "127.0.0.1", free_port()), None, connect_timeout=1)
    reason = await grpc_health_check(pool, "", 1)
    assert reason is not None and "connect" in reason
