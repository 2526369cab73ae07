"""Errors keep their meaning across every hop: allocator → coild → CNI plugin → runtime.

A real allocator over etcd sits behind a pass-through gRPC front that can make one method answer
a chosen status (the allocator's "lost N races, try again" is hard to provoke on purpose); a real
coild agent serves the real CNI plugin (the installed launcher, exec'd as a runtime execs it).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil_allocator.allocator import Allocator
from coil_grpc.status import status_of
from coild.agent import AgentConfig, NodeAgent
from coild.allocator_client import _ERRORS, AllocatorClient
from coild.errors import AllocatorRejected, AllocatorUnavailable
from coild.server import serve as serve_agent
from tests.test_cni_plugin import ADD_ENV, launcher, netconf, run  # noqa: F401 - fixture
from tests.test_nodeagent import (
    NODE,
    RecordingRoutes,
    held_blocks,
    pod_addresses_of,
    records_of,
    request,
    routes_of,
)


class Front(apb_grpc.AllocatorServiceServicer):
    """Passes every call to the real allocator, except the methods in `fail`, which answer
    their status instead, and those in `lose_answer`, which are passed on (and so take effect)
    but answer their status: a commit whose answer was lost. A method in `before` or `after`
    calls its function before passing the call on, or once the allocator has answered (to hold
    a call back, or to note that it went through)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = apb_grpc.AllocatorServiceStub(channel)
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.lose_answer: dict[str, grpc.StatusCode] = {}
        self.before: dict[str, Callable[[], None]] = {}
        self.after: dict[str, Callable[[], None]] = {}

    def __getattribute__(self, name: str) -> Any:
        if name[:1].isupper():
            stub = object.__getattribute__(self, "_stub")
            fail = object.__getattribute__(self, "fail")
            lose = object.__getattribute__(self, "lose_answer")
            before = object.__getattribute__(self, "before")
            after = object.__getattribute__(self, "after")

            def call(request: Any, context: grpc.ServicerContext) -> Any:
                if name in fail:
                    context.abort(*fail[name])
                if name in before:
                    before[name]()
                try:
                    answer = getattr(stub, name)(request, timeout=10)
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
                if name in after:
                    after[name]()
                if name in lose:
                    context.abort(lose[name], f"{name}: deadline passed (the answer was lost)")
                return answer

            return call
        return object.__getattribute__(self, name)


@pytest.fixture
def front(allocator_addr: str) -> Iterator[tuple[Front, str]]:
    directory = tempfile.mkdtemp(prefix="coil-front-")
    path = os.path.join(directory, "front.sock")
    channel = grpc.insecure_channel(allocator_addr)
    servicer = Front(channel)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    apb_grpc.add_AllocatorServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield servicer, f"unix:{path}"
    finally:
        server.stop(grace=None).wait()
        channel.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def coild_agent(front: tuple[Front, str]) -> Iterator[NodeAgent]:
    """A node agent whose allocator is the front; only the test runs its maintenance."""
    client = AllocatorClient(front[1], timeout=5)
    origin = time.monotonic()
    agent = NodeAgent(
        AgentConfig(node=NODE, maintain_interval=3600, release_grace=0),
        client,
        RecordingRoutes(),
        clock=lambda: time.monotonic() - origin,
    )
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        client.close()


@pytest.fixture
def coild_socket(coild_agent: NodeAgent) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="coil-hops-")
    socket = os.path.join(directory, "coild.sock")
    server = serve_agent(coild_agent, socket, workers=4)
    try:
        yield socket
    finally:
        server.stop(grace=None).wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_every_allocator_status_has_its_meaning_in_coild() -> None:
    """No status falls through to "unexpected" by omission."""
    every = set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(_ERRORS) == every
    retry = {c for c, cls in _ERRORS.items() if status_of(cls("x")) in _RETRYABLE}
    assert retry == {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
    assert _ERRORS[grpc.StatusCode.INTERNAL] is AllocatorRejected


_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION],
    ids=["aborted", "failed-precondition"],
)
def test_allocator_try_again_is_cni_11_at_the_plugin(
    allocator: Allocator,
    front: tuple[Front, str],
    coild_socket: str,
    launcher: str,  # noqa: F811 - the fixture
    code: grpc.StatusCode,
) -> None:
    allocator.create_pool("default", ["10.61.0.0/24"], 3)
    servicer, _ = front
    servicer.fail["RecordAllocations"] = (code, "record allocations: lost 5 races; try again")
    out = run(launcher, "ADD", netconf(coild_socket), ADD_ENV)
    assert out.rc == 1
    assert out.output["code"] == 11, out.output
    assert "lost 5 races" in out.output["details"]
    assert records_of(allocator) == {}
    # Once the allocator answers again, the same ADD succeeds.
    del servicer.fail["RecordAllocations"]
    out = run(launcher, "ADD", netconf(coild_socket), ADD_ENV)
    assert out.rc == 0, out.output
    assert len(records_of(allocator)) == 1


# -- outcomes unknown --------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["del", "add-again", "gc"])
def test_a_record_that_commits_after_a_failed_add_does_not_leak(
    allocator: Allocator,
    front: tuple[Front, str],
    coild_socket: str,
    launcher: str,  # noqa: F811 - the fixture
    then: str,
) -> None:
    """Regression: coild forgot an attachment whose record call timed out; the record
    committed anyway, the runtime's DEL answered success without telling the allocator, and
    the record stayed for good."""
    allocator.create_pool("default", ["10.62.0.0/24"], 3)
    servicer, _ = front
    servicer.lose_answer["RecordAllocations"] = grpc.StatusCode.UNAVAILABLE
    out = run(launcher, "ADD", netconf(coild_socket), ADD_ENV)
    assert (out.rc, out.output["code"]) == (1, 11), out.output
    assert len(records_of(allocator)) == 1  # committed after all
    del servicer.lose_answer["RecordAllocations"]
    if then == "del":
        assert run(launcher, "DEL", netconf(coild_socket), ADD_ENV).rc == 0
        assert records_of(allocator) == {}
    elif then == "add-again":
        out = run(launcher, "ADD", netconf(coild_socket), ADD_ENV)
        assert out.rc == 0, out.output
        (address,) = records_of(allocator)
        assert out.output["ips"][0]["address"].split("/")[0] == str(address)
        assert run(launcher, "DEL", netconf(coild_socket), ADD_ENV).rc == 0
        assert records_of(allocator) == {}
    else:
        conf = netconf(coild_socket, "1.1.0", **{"cni.dev/valid-attachments": []})
        env = {"CNI_CONTAINERID": "", "CNI_IFNAME": "", "CNI_NETNS": ""}
        assert run(launcher, "GC", conf, env).rc == 0
        assert records_of(allocator) == {}


def test_two_retries_of_an_uncertain_add_answer_what_is_recorded(
    allocator: Allocator, front: tuple[Front, str], coild_agent: NodeAgent
) -> None:
    """Regression (the fault storm's "addresses held twice at once"): an ADD whose record call
    failed with its outcome unknown was retried twice at once (the runtime's first retry timed
    out while coild was still giving back the doubtful address). Each retry released the
    attachment's doubtful addresses by container ID; one then recorded the address again and
    answered it, and the other's release, coming after, deleted that record. The pod kept an
    address that etcd called free, and the next pod got it too."""
    allocator.create_pool("default", ["10.62.0.0/24"], 3)
    agent = coild_agent
    servicer, _ = front
    servicer.lose_answer["RecordAllocations"] = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(AllocatorUnavailable):
        agent.allocate(request("pod-a"))
    del servicer.lose_answer["RecordAllocations"]
    (doubtful,) = records_of(allocator)  # committed after all
    # Fill the block, so that the doubtful address is the one a new choice lands on.
    (block,) = held_blocks(allocator)
    room = len(pod_addresses_of(block, ipaddress.ip_network("10.62.0.0/24")))
    for i in range(room - 1):
        agent.allocate(request(f"other-{i}"))
    assert len(records_of(allocator)) == room
    assert held_blocks(allocator) == {block}
    go, recorded, first_release = threading.Event(), threading.Event(), threading.Event()
    releases: list[int] = []

    def hold_release() -> None:
        releases.append(1)
        if len(releases) == 1:
            first_release.set()
            go.wait(10)  # the first retry's release, held until the second retry is in
        else:
            recorded.wait(10)  # a later release arrives after the first retry's record

    servicer.before["ReleaseAllocations"] = hold_release
    servicer.after["RecordAllocations"] = recorded.set
    answers: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            answers[name] = [str(a.address) for a in agent.allocate(request("pod-a"))]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    first = threading.Thread(target=add, args=("first",))
    first.start()
    assert first_release.wait(10)
    second = threading.Thread(target=add, args=("second",))
    second.start()
    # Let the second retry get as far as it goes while the first one's release is held.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and agent._releases._queue.qsize() == 0:
        time.sleep(0.02)
    time.sleep(0.2)
    go.set()
    first.join(20)
    second.join(20)
    assert not errors, errors
    assert answers["first"] == answers["second"] == [str(doubtful)], answers
    # What both retries answered is recorded for the pod, and no other pod can get it.
    assert records_of(allocator).get(doubtful) is not None, "the answered address is free"
    assert records_of(allocator)[doubtful].container_id == "pod-a"
    (got,) = agent.allocate(request("next-pod"))
    assert got.address != doubtful
    agent.release("pod-a", "eth0")
    assert doubtful not in records_of(allocator)


def test_a_block_release_that_commits_after_a_timeout_is_taken_as_done(
    allocator: Allocator, front: tuple[Front, str], coild_agent: NodeAgent
) -> None:
    """Regression: a block release whose answer was lost left coild holding (and announcing)
    the block; asked again, the allocator's "not held by any node" was taken as a refusal."""
    allocator.create_pool("default", ["10.63.0.0/24"], 3)
    agent = coild_agent
    pods = []
    while len(held_blocks(allocator)) < 2:
        pods.append(f"p{len(pods)}")
        agent.allocate(request(pods[-1]))
    for pod in pods:
        agent.release(pod, "eth0")
    agent.sync_routes()
    assert len(routes_of(agent)) == 2
    servicer, _ = front
    servicer.lose_answer["ReleaseBlock"] = grpc.StatusCode.DEADLINE_EXCEEDED
    agent.maintain()
    (kept,) = held_blocks(allocator)  # the youngest block was released in etcd
    # Until coild knows, it hands out nothing from the block in doubt.
    (got,) = agent.allocate(request("meanwhile"))
    assert got.address in kept
    del servicer.lose_answer["ReleaseBlock"]
    agent.maintain()
    agent.sync_routes()
    assert routes_of(agent) == {kept} == held_blocks(allocator)
