"""The floor: the cheapest CNI IPAM plugin that can be written in Python with grpc.

It does what coil's plugin must do and nothing more: read the configuration on stdin and the CNI_*
environment, make one unary call to the node agent's socket (``ipam.socket``) and print the result.
No validation, no error mapping. The bench's canned server answers at once, so the time of an exec
is the interpreter's start, the imports, one RPC and the exit.

Run as a plain script (``python floor_plugin.py``: site, every import grpc makes, normal exit), or
through the bench's launchers that change only how it starts (``-I -S`` with an explicit sys.path,
asyncio deferred, ``os._exit``): see bench/cni.py.
"""

import json
import os
import sys

import grpc

from coil.v1 import nodeagent_pb2 as pb
from coil.v1 import nodeagent_pb2_grpc as pb_grpc


def main(fast_exit: bool = False) -> None:
    conf = json.loads(sys.stdin.buffer.read())
    env = os.environ
    command = env["CNI_COMMAND"]
    attachment = pb.Attachment(container_id=env["CNI_CONTAINERID"], interface=env["CNI_IFNAME"])
    out = None
    with grpc.insecure_channel("unix:" + conf["ipam"]["socket"]) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        if command == "ADD":
            reply = stub.Allocate(pb.AllocateRequest(attachment=attachment), timeout=5)
            ips = [{"address": a.address, "gateway": a.gateway} for a in reply.addresses]
            out = {"cniVersion": conf["cniVersion"], "ips": ips, "dns": {}}
        elif command == "DEL":
            stub.Release(pb.ReleaseRequest(attachment=attachment), timeout=5)
        elif command == "CHECK":
            stub.Check(pb.CheckRequest(attachment=attachment), timeout=5)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    if fast_exit:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
