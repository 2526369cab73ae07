"""The Kubernetes manifests (deploy/kubernetes), rendered with `kubectl kustomize` as an operator
would, keep what makes them come up where coil is the only CNI and what keeps them least
privileged: host network and priority classes, tolerations, capabilities, host paths, secrets as
files, mutual TLS with node identities, probes, metrics port names, the disruption budget. The
environment they set must be flags the programs read, and file paths must lie on mounted volumes.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.main import FLAGS as ALLOCATOR_FLAGS
from coild.main import FLAGS as COILD_FLAGS
from tests.harness.cluster import BIN, Proc, spawn, wait_until
from tests.harness.etcd import EtcdServer, free_port
from tests.harness.net import Netns
from tests.harness.pki import Pki
from tests.harness.relay import relay_into

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", ROOT / "scripts" / "validate_manifests.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _script()
TARGETS = [DEPLOY / "base", DEPLOY / "overlays" / "example"]


class Rendered:
    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def allocator(self) -> dict[str, Any]:
        return self.one("Deployment", "coil-allocator")

    @property
    def coild(self) -> dict[str, Any]:
        return self.one("DaemonSet", "coild")


@pytest.fixture(scope="module", params=TARGETS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(validate.render(request.param))


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (found,) = [c for c in pod(workload).get(key, []) if c["name"] == name]
    return found


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def value(c: dict[str, Any], name: str) -> str:
    return str(env(c)[name]["value"])


def mounted(c: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volumeMount of `c` that holds `path`, if any."""
    for m in c.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return dict(m)
    return None


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in pod(workload)["volumes"] if v["name"] == name]
    return dict(found)


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- validity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", validate.targets(), ids=lambda p: p.name)
def test_manifests_validate_against_three_kubernetes_versions(target: Path) -> None:
    versions = validate.versions()
    assert len(versions) == 3 and len({v.rsplit(".", 1)[0] for v in versions}) == 3
    objects = validate.render(target)
    for version in versions:
        assert validate.problems(objects, version) == []


def test_validation_names_an_unknown_field(tmp_path: Path) -> None:
    """The validator is strict: a misspelt field (which Kubernetes would silently drop) fails."""
    overlay = tmp_path / "typo"
    overlay.mkdir()
    base = Path("..") / Path(*[".."] * len(overlay.parts[1:])) / DEPLOY.relative_to("/") / "base"
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{base}]\n"
        "patches:\n"
        "  - patch: |-\n"
        "      {apiVersion: apps/v1, kind: DaemonSet, metadata: {name: coild},\n"
        "       spec: {template: {spec: {hostNetwrok: true}}}}\n"
    )
    objects = validate.render(overlay)
    found = validate.problems(objects, validate.versions()[0])
    assert len(found) == 1
    assert "DaemonSet/coild" in found[0] and "'hostNetwrok' was unexpected" in found[0]


# -- the allocator ----------------------------------------------------------------------------


def test_allocator_runs_before_pod_networking_exists(rendered: Rendered) -> None:
    spec = pod(rendered.allocator)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default"  # the host's resolver: cluster DNS needs coil
    assert spec["priorityClassName"] == "system-cluster-critical"
    tolerated = {(t.get("key"), t.get("effect")) for t in spec["tolerations"]}
    for key in (
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/network-unavailable",
        "node-role.kubernetes.io/control-plane",
    ):
        assert (key, "NoSchedule") in tolerated, key


def test_allocator_has_two_replicas_on_different_nodes_and_a_budget(rendered: Rendered) -> None:
    deployment = rendered.allocator
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (term,) = pod(deployment)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    (pdb,) = rendered.kinds("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


def test_allocator_has_probes_resources_and_no_privilege(rendered: Rendered) -> None:
    spec = pod(rendered.allocator)
    (c,) = spec["containers"]
    assert "readinessProbe" in c and "livenessProbe" in c
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert not [v for v in spec["volumes"] if "hostPath" in v]


def test_allocator_serves_mutual_tls_trusting_the_cluster_ca(rendered: Rendered) -> None:
    deployment = rendered.allocator
    (c,) = pod(deployment)["containers"]
    for name in ("COIL_TLS_CERT", "COIL_TLS_KEY", "COIL_TLS_CLIENT_CA"):
        assert value(c, name)
    ca = mounted(c, value(c, "COIL_TLS_CLIENT_CA"))
    assert ca is not None
    assert volume(deployment, ca["name"])["configMap"]["name"] == "kube-root-ca.crt"
    for name in ("COIL_TLS_KEY", "COIL_ETCD_TLS_KEY", "COIL_ETCD_TLS_CERT", "COIL_ETCD_TLS_CA"):
        m = mounted(c, value(c, name))
        assert m is not None and m.get("readOnly") is True, name
        assert "secret" in volume(deployment, m["name"]), name


# -- coild ------------------------------------------------------------------------------------


def test_coild_runs_on_every_node_with_host_network(rendered: Rendered) -> None:
    spec = pod(rendered.coild)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]


def test_coild_has_net_admin_only_and_is_not_privileged(rendered: Rendered) -> None:
    c = container(rendered.coild, "coild")
    sc = c["securityContext"]
    assert sc.get("privileged") is not True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["readOnlyRootFilesystem"] is True
    init = container(rendered.coild, "install-cni", init=True)
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert init["securityContext"].get("privileged") is not True
    spec = pod(rendered.coild)
    assert not spec.get("hostPID") and not spec.get("hostIPC")


def test_coild_mounts_only_what_it_uses(rendered: Rendered) -> None:
    daemonset = rendered.coild
    host_paths = {
        v["name"]: v["hostPath"]["path"] for v in pod(daemonset)["volumes"] if "hostPath" in v
    }
    assert sorted(host_paths.values()) == [
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/run/coil",
        "/var/lib/kubelet/pki",
    ]
    coild = container(daemonset, "coild")
    init = container(daemonset, "install-cni", init=True)
    used = {m["name"]: m for m in coild["volumeMounts"]}
    cni = {n for n, p in host_paths.items() if p in ("/opt/cni/bin", "/etc/cni/net.d")}
    assert not cni & used.keys(), "the CNI directories are the installer's only"
    assert {m["name"] for m in init["volumeMounts"]} == cni
    # The conflist the installer writes points the plugin at coild's socket, on the host.
    assert init["command"] == [
        "coil-install",
        "--host-root",
        "/host",
        "--socket",
        value(coild, "COILD_SOCKET"),
    ]
    socket_volume = mounted(coild, value(coild, "COILD_SOCKET"))
    assert socket_volume is not None
    assert socket_volume["mountPath"] == host_paths[socket_volume["name"]]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {
        "/host/opt/cni/bin",
        "/host/etc/cni/net.d",
    }
    pki = [n for n, p in host_paths.items() if p == "/var/lib/kubelet/pki"]
    assert used[pki[0]]["readOnly"] is True
    assert mounted(coild, value(coild, "COILD_SOCKET")) is not None


def test_coild_reaches_the_allocator_by_cluster_ip_with_its_node_identity(
    rendered: Rendered,
) -> None:
    daemonset = rendered.coild
    c = container(daemonset, "coild")
    # Kubernetes expands these from the Service "coil-allocator" in the pod's namespace.
    assert value(c, "COIL_ALLOCATOR") == (
        "$(COIL_ALLOCATOR_SERVICE_HOST):$(COIL_ALLOCATOR_SERVICE_PORT)"
    )
    assert pod(daemonset).get("enableServiceLinks", True) is True
    service = rendered.one("Service", "coil-allocator")
    assert service["metadata"]["name"] == "coil-allocator"
    assert service["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert service["spec"].get("clusterIP") != "None"
    assert service["spec"]["ports"][0]["port"] == 9380  # _SERVICE_PORT is the first port
    namespace = service["metadata"]["namespace"]
    assert value(c, "COILD_ALLOCATOR_TLS_SERVER_NAME") == f"coil-allocator.{namespace}.svc"
    kubelet = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    assert value(c, "COILD_ALLOCATOR_TLS_CERT") == kubelet
    assert value(c, "COILD_ALLOCATOR_TLS_KEY") == kubelet
    ca = mounted(c, value(c, "COILD_ALLOCATOR_TLS_CA"))
    assert ca is not None
    secret = volume(daemonset, ca["name"])["secret"]
    assert [i["key"] for i in secret["items"]] == ["ca.crt"], "coild never gets the server key"


# -- both -------------------------------------------------------------------------------------


def test_no_service_account_token_is_mounted(rendered: Rendered) -> None:
    for workload in (rendered.allocator, rendered.coild):
        assert pod(workload)["automountServiceAccountToken"] is False
        account = rendered.one("ServiceAccount", pod(workload)["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False


def test_secrets_reach_containers_as_files_only(rendered: Rendered) -> None:
    for workload in (rendered.allocator, rendered.coild):
        for c in all_containers(workload):
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), (c["name"], e["name"])
            assert not [s for s in c.get("envFrom", []) if "secretRef" in s]
        for v in pod(workload)["volumes"]:
            if "secret" in v:
                assert v["secret"]["defaultMode"] & 0o007 == 0 or v["name"] == "allocator-ca"


def test_env_is_flags_the_programs_read_and_paths_are_mounted(rendered: Rendered) -> None:
    """An env var coil does not read, a $(VAR) Kubernetes cannot expand, or a file path on no
    volume would each leave a pod that starts wrong."""
    services = {
        s["metadata"]["name"].upper().replace("-", "_")
        for s in rendered.kinds("Service")
        if s["spec"].get("clusterIP") != "None"
    }
    service_vars = {f"{s}_SERVICE_{p}" for s in services for p in ("HOST", "PORT")}
    programs = {
        "coil-allocator": {f[1] for f in ALLOCATOR_FLAGS},
        "coild": {f[1] for f in COILD_FLAGS},
    }
    for workload in (rendered.allocator, rendered.coild):
        for c in all_containers(workload):
            names = [e["name"] for e in c.get("env", [])]
            known = programs.get(c["command"][0])
            defined: set[str] = set(service_vars)
            for e in c.get("env", []):
                text = str(e.get("value", ""))
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
                    assert ref in defined, (
                        f"{c['name']}: {e['name']} uses $({ref}) before it exists"
                    )
                defined.add(e["name"])
                if known is not None:
                    referenced = any(f"$({e['name']})" in str(o.get("value", "")) for o in c["env"])
                    assert e["name"] in known or referenced, f"{c['name']}: {e['name']} is no flag"
                if text.startswith("/") and e["name"] != "COILD_SOCKET":
                    assert mounted(c, text), f"{c['name']}: {e['name']}={text} is on no volume"
            assert len(names) == len(set(names))


def test_metrics_ports_are_named_for_a_service_monitor(rendered: Rendered) -> None:
    monitored = [s for s in rendered.kinds("Service") if "metrics" in s["metadata"]["name"]]
    assert len(monitored) == 2
    for workload in (rendered.allocator, rendered.coild):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        (c,) = pod(workload)["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert "metrics" in ports
        (service,) = [s for s in monitored if s["spec"]["selector"].items() <= labels.items()]
        assert service["spec"]["clusterIP"] == "None"
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
        assert service["spec"]["ports"][0]["port"] == ports["metrics"]
        assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "coil"


def test_one_image_for_every_container(rendered: Rendered) -> None:
    images = {
        (c["image"], c["imagePullPolicy"])
        for w in (rendered.allocator, rendered.coild)
        for c in all_containers(w)
    }
    assert images == {("localhost/coil:latest", "IfNotPresent")}


def test_example_reads_the_etcd_password_from_the_secret_file() -> None:
    rendered = Rendered(validate.render(DEPLOY / "overlays" / "example"))
    deployment = rendered.allocator
    (c,) = pod(deployment)["containers"]
    path = value(c, "COIL_ETCD_PASSWORD_FILE")
    m = mounted(c, path)
    assert m is not None
    assert volume(deployment, m["name"])["secret"]["secretName"] == "coil-etcd"
    assert "COIL_ETCD_PASSWORD" not in env(c)


def test_uninstaller_runs_the_installer_with_uninstall_and_nothing_else() -> None:
    rendered = Rendered(validate.render(DEPLOY / "uninstall"))
    (daemonset,) = rendered.objects
    assert daemonset["kind"] == "DaemonSet"
    spec = pod(daemonset)
    assert spec["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in spec["tolerations"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["coil-install", "--host-root", "/host", "--uninstall"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {
        "/host/opt/cni/bin",
        "/host/etc/cni/net.d",
    }
    assert sorted(v["hostPath"]["path"] for v in spec["volumes"]) == [
        "/etc/cni/net.d",
        "/opt/cni/bin",
    ]
    for c in all_containers(daemonset):
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"].get("privileged") is not True
    base = Rendered(validate.render(DEPLOY / "base"))
    assert daemonset["metadata"]["namespace"] == base.coild["metadata"]["namespace"]
    assert {c["image"] for c in all_containers(daemonset)} == {
        c["image"] for c in all_containers(base.coild)
    }


# -- coild as the DaemonSet runs it -----------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("grant", ["manifest", "nothing"])
def test_coild_needs_exactly_the_capabilities_the_manifest_grants(
    grant: str, etcd_server: EtcdServer, allocator: Allocator, etcd_prefix: str, tmp_path: Path
) -> None:
    """coild as root with only the manifest's capabilities, its environment (server name, one
    kubelet-style PEM file for certificate and key) and mutual TLS to an allocator that trusts
    the "cluster CA": it serves a pod and writes the block's route to table 119. With no
    capability at all the route write is refused and no pod gets an address, so the capability
    granted is needed too."""
    daemonset = Rendered(validate.render(DEPLOY / "base")).coild
    manifest = container(daemonset, "coild")
    caps = manifest["securityContext"]["capabilities"]["add"] if grant == "manifest" else []
    server_name = value(manifest, "COILD_ALLOCATOR_TLS_SERVER_NAME")
    assert value(manifest, "COILD_ALLOCATOR_TLS_CERT") == value(manifest, "COILD_ALLOCATOR_TLS_KEY")

    pki = Pki(tmp_path / "pki")
    cluster_ca, coil_ca = pki.ca("kubernetes"), pki.ca("coil-allocator-ca")
    server = pki.issue(coil_ca, "coil-allocator", server=True, names=f"DNS:{server_name}")
    node = pki.issue(cluster_ca, "node-1", subject="/O=system:nodes/CN=system:node:node-1")
    kubelet_pem = tmp_path / "kubelet-client-current.pem"
    kubelet_pem.write_bytes(node.cert.read_bytes() + node.key.read_bytes())
    kubelet_pem.chmod(0o600)
    allocator.create_pool("default", ["10.76.0.0/24"], 3)

    # TLS on TCP (the allocator's UNIX sockets are plaintext, for root on the host), relayed into
    # the node's namespace as 127.0.0.1:9380 there.
    listen = f"127.0.0.1:{free_port()}"
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    tls += ["--tls-client-ca", str(cluster_ca.cert)]
    alloc = spawn(
        "coil-allocator",
        [str(BIN / "coil-allocator"), "--listen", listen, "--metrics-addr", ""]
        + ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, *tls],
        tmp_path / "allocator.log",
    )
    ns = Netns.create("coilt-")
    socket = tmp_path / "coil" / "coild.sock"
    socket.parent.mkdir()
    coild = None
    relays: list[Proc] = []
    try:
        relays = relay_into(ns, 9380, listen, tmp_path)
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
        env = {
            "COIL_NODE_NAME": "node-1",
            "COIL_ALLOCATOR": "127.0.0.1:9380",
            "COILD_ALLOCATOR_TLS_SERVER_NAME": server_name,
            "COILD_ALLOCATOR_TLS_CA": str(coil_ca.cert),
            "COILD_ALLOCATOR_TLS_CERT": str(kubelet_pem),
            "COILD_ALLOCATOR_TLS_KEY": str(kubelet_pem),
            "COILD_SOCKET": str(socket),
            "COILD_METRICS_ADDR": "",
        }
        coild = spawn(
            "coild",
            ["ip", "netns", "exec", ns.name, "setpriv", f"--bounding-set={bounding}"]
            + ["--inh-caps=-all", "--no-new-privs", str(BIN / "coild")],
            tmp_path / "coild.log",
            env,
        )
        wait_until("coild's socket", socket.exists, proc=coild)
        status = Path(f"/proc/{coild.popen.pid}/status").read_text()
        if grant == "manifest":
            with grpc.insecure_channel(f"unix:{socket}") as ch:
                reply = wait_until("an address from coild", lambda: _allocate(ch), proc=coild)
            assert reply.addresses[0].address.startswith("10.76.0.")
            assert "CapBnd:\t0000000000001000" in status  # NET_ADMIN alone
            routes = wait_until("the block's route", lambda: ns.routes("119"), proc=coild)
            assert [r["type"] for r in routes] == ["blackhole"]
            address = ipaddress.ip_interface(reply.addresses[0].address).ip
            assert address in ipaddress.ip_network(routes[0]["dst"])
            assert "Operation not permitted" not in coild.log.read_text()
        else:
            assert "CapBnd:\t0000000000000000" in status
            with grpc.insecure_channel(f"unix:{socket}") as ch:
                # The pod's ADD claims a block whose route cannot be written: coild hands out no
                # address from it and says "try again" (UNAVAILABLE, the plugin's code 11).
                def refused() -> bool:
                    assert _allocate(ch) is None
                    return "Operation not permitted" in coild.log.read_text()

                wait_until("the refused route write", refused, proc=coild)
                assert _allocate(ch) is None
            assert ns.routes("119") == []
    finally:
        if coild is not None:
            coild.stop()
        for relay in relays:
            relay.stop()
        alloc.stop()
        ns.delete()


def _allocate(ch: grpc.Channel) -> Any:
    try:
        return npb_grpc.NodeAgentServiceStub(ch).Allocate(
            npb.AllocateRequest(
                attachment=npb.Attachment(container_id="c0ffee", interface="eth0"),
                namespace="default",
                pod="web",
            ),
            timeout=5,
        )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:  # coild still rebuilding its state
            return None
        raise
