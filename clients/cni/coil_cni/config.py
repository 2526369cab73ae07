"""Parsing and validation of what a runtime hands the plugin: the CNI_* environment and the network
configuration on stdin; and the shape of the results printed back. Pure functions, no I/O, no grpc.

Every function raises ``CNIError`` with the CNI code for the problem and a message quoting the
input.

Imports are kept to what every pod needs (see coil_cni.main): no ``typing``, ``json``, ``re`` or
``collections`` at load time, ``ipaddress`` only where addresses are read.
"""

from __future__ import annotations

from coil_cni import jsonio
from coil_cni.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    CNIError,
    cut,
    quote,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# The oldest configuration version that may carry each command (CNI spec; libcni's skel agrees).
MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

DEFAULT_SOCKET = "/run/coild.sock"
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 3600  # seconds; a runtime gives up on a plugin long before
DEFAULT_NAMESPACE = "default"

# CNI_ARGS keys a Kubernetes runtime sends, and IP (static addresses: podman's --ip); any other
# key needs IgnoreUnknown=1.
KNOWN_ARGS = (
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
)

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_CONTAINER_ID_REST = _ALNUM | frozenset("_.-")
_CONTAINER_ID_MAX = 255
_IFNAME_MAX = 15  # IFNAMSIZ - 1
_SOCKET_PATH_MAX = 107  # bytes: sun_path is 108 with its terminating NUL


class _Value:
    """A small immutable value compared by its fields (``typing.NamedTuple`` without importing
    typing, which would cost every pod)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({inner})"


class IpamConfig(_Value):
    """The ``ipam`` section: where coild listens and how long one call may take (seconds)."""

    __slots__ = ("socket", "timeout")
    socket: str
    timeout: float

    def __init__(self, socket: str, timeout: float) -> None:
        object.__setattr__(self, "socket", socket)
        object.__setattr__(self, "timeout", timeout)


class Attachment(_Value):
    """One interface of one container: (CNI_CONTAINERID, CNI_IFNAME)."""

    __slots__ = ("container_id", "ifname")
    container_id: str
    ifname: str

    def __init__(self, container_id: str, ifname: str) -> None:
        object.__setattr__(self, "container_id", container_id)
        object.__setattr__(self, "ifname", ifname)

    def __str__(self) -> str:
        return f"{self.container_id}/{self.ifname}"


class CniArgs(_Value):
    """What coil reads from CNI_ARGS: the Kubernetes namespace and pod name ("default" and "" when
    absent), and the value of IP= as given ("" when absent; checked by requested_addresses)."""

    __slots__ = ("namespace", "pod", "ip")
    namespace: str
    pod: str
    ip: str

    def __init__(self, namespace: str, pod: str, ip: str = "") -> None:
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "pod", pod)
        object.__setattr__(self, "ip", ip)


class Address(_Value):
    """An address of a result as coild gave it: CIDR form and gateway."""

    __slots__ = ("address", "gateway")
    address: str
    gateway: str

    def __init__(self, address: str, gateway: str) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "gateway", gateway)


def _valid_container_id(value: str) -> bool:
    """``[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}``, checked without loading ``re``."""
    return (
        0 < len(value) <= _CONTAINER_ID_MAX
        and value[0] in _ALNUM
        and all(c in _CONTAINER_ID_REST for c in value)
    )


_CONTAINER_ID_RULE = "1-255 letters, digits, '_', '.', '-', not starting with a punctuation mark"
_IFNAME_RULE = "at most 15 bytes, no '/', ':' or whitespace"


def _valid_ifname(value: str) -> bool:
    """A name Linux accepts for an interface (what ``dev_valid_name`` checks)."""
    return (
        bool(value)
        and _printable_utf8(value)
        and len(value.encode()) <= _IFNAME_MAX
        and value not in (".", "..")
        and not any(c in value for c in "/:")
        and not any(c.isspace() for c in value)
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _printable_utf8(text: str) -> bool:
    """False for text with bytes that were not UTF-8 (os.environ keeps them as surrogates) or
    with control characters."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return text.isprintable()


def parse_netconf(data: bytes) -> dict[str, Any]:
    """Decode the configuration on stdin; code 6 if it is not a JSON object."""
    try:
        conf = jsonio.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested beyond any real config
        shown = data[:200].decode("utf-8", "replace")
        raise CNIError(
            DECODING_FAILURE, f"network configuration on stdin is not valid JSON: {shown!r}", str(e)
        ) from None
    if not isinstance(conf, dict):
        raise CNIError(
            DECODING_FAILURE,
            f"network configuration on stdin is not a JSON object: {_shown(conf)}",
        )
    return conf


def config_version(conf: Mapping[str, Any], command: str) -> str:
    """The configuration's cniVersion, checked to be supported and to allow ``command``.

    Raises code 1 for an unsupported or missing version (absent means "0.1.0" in CNI) or one too old
    for the command (CHECK needs 0.4.0, GC and STATUS 1.1.0), code 7 if it is not a string.
    """
    version = conf.get("cniVersion")
    supported = ", ".join(SUPPORTED_VERSIONS)
    if version is None:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            'network configuration has no cniVersion (which means "0.1.0"); '
            f"supported: {supported}",
        )
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, f"cniVersion must be a string, got {_shown(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {quote(version)}; supported: {supported}",
        )
    minimum = MIN_VERSION.get(command)
    if minimum is not None and _version_key(version) < _version_key(minimum):
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} does not allow {command}; "
            f"it needs cniVersion {minimum} or later",
        )
    return version


def _shown(value: Any) -> str:
    """A JSON value as it appears in a message: its JSON text, cut to a readable length."""
    return cut(jsonio.dumps(value))


def _socket_path_ok(path: str) -> bool:
    """An absolute path a UNIX socket can have: no NUL, UTF-8, at most 107 bytes."""
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        return False
    return path.startswith("/") and b"\0" not in encoded and len(encoded) <= _SOCKET_PATH_MAX


def parse_ipam(conf: Mapping[str, Any]) -> IpamConfig:
    """The ``ipam`` section; code 7 if missing, not for coil, or with a bad socket or timeout."""
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict):
        shown = "missing" if ipam is None else f"not an object: {_shown(ipam)}"
        raise CNIError(INVALID_CONFIG, f"network configuration has no ipam section ({shown})")
    if ipam.get("type") != "coil":
        raise CNIError(INVALID_CONFIG, f'ipam.type must be "coil", got {_shown(ipam.get("type"))}')
    socket = ipam.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket, str) or not _socket_path_ok(socket):
        raise CNIError(
            INVALID_CONFIG,
            "ipam.socket must be an absolute path of coild's socket (UTF-8, no NUL, at most "
            f"{_SOCKET_PATH_MAX} bytes), got {_shown(socket)}",
        )
    timeout = ipam.get("timeout", DEFAULT_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT  # also false for NaN
    ):
        raise CNIError(
            INVALID_CONFIG,
            f"ipam.timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT}, "
            f"got {_shown(timeout)}",
        )
    return IpamConfig(socket=socket, timeout=float(timeout))


def _ip_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CNIError(
            INVALID_CONFIG, f"{where} must be a list of address strings, got {_shown(value)}"
        )
    return value


def _object(conf: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = conf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CNIError(INVALID_CONFIG, f"{where} must be an object, got {_shown(value)}")
    return value


def requested_addresses(conf: Mapping[str, Any], cni_args_ip: str = "") -> list[str]:
    """Static addresses asked for, without prefix length, de-duplicated in order, from three
    places: ``runtimeConfig.ips`` (the "ips" capability), ``args.cni.ips``, and CNI_ARGS ``IP=``
    (``cni_args_ip``: one address or a comma-separated list; podman's ``--ip``). They are merged,
    as host-local merges them; coild refuses more than one address per family (code 7 through
    its INVALID_ARGUMENT). Code 7 here for anything that is not a list of strings or an entry that
    is not an address (with or without "/prefix"), naming where the entry came from."""
    found: list[tuple[str, str]] = []
    runtime_ips = _object(conf, "runtimeConfig", "runtimeConfig").get("ips")
    if runtime_ips is not None:
        found += [(ip, "runtimeConfig.ips") for ip in _ip_list(runtime_ips, "runtimeConfig.ips")]
    cni_args = _object(_object(conf, "args", "args"), "cni", "args.cni")
    args_ips = cni_args.get("ips")
    if args_ips is not None:
        found += [(ip, "args.cni.ips") for ip in _ip_list(args_ips, "args.cni.ips")]
    if cni_args_ip:
        found += [(ip, "CNI_ARGS IP") for ip in cni_args_ip.split(",")]
    if not found:
        return []
    import ipaddress

    result: list[str] = []
    for entry, where in found:
        try:
            if "%" in entry:
                raise ValueError("scoped addresses are link-local; pods cannot ask for them")
            address = str(ipaddress.ip_address(entry.split("/", 1)[0]))
            if "/" in entry:
                ipaddress.ip_interface(entry)  # the prefix length must be valid too
        except ValueError:
            raise CNIError(
                INVALID_CONFIG,
                f"{where}: {quote(entry)} is not an IP address (with or without /prefix)",
            ) from None
        if address not in result:
            result.append(address)
    return result


def parse_cni_args(value: str) -> CniArgs:
    """Parse CNI_ARGS (``K=V;K=V``) into the pod's namespace and name and the IP= value.

    Empty items are skipped. Code 4 for an item without "=" or with an empty key, an IgnoreUnknown
    that is not a boolean, or a key coil does not know when IgnoreUnknown is not true. IP= is
    checked by ``requested_addresses`` (code 7).
    """
    pairs: dict[str, str] = {}
    for item in value.split(";"):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS item {quote(item)} is not KEY=VALUE (CNI_ARGS={quote(value)})",
            )
        if not _printable_utf8(key + val):
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS item {quote(item)} is not printable UTF-8 text",
            )
        pairs[key] = val
    ignore = pairs.get("IgnoreUnknown", "false").lower()
    if ignore not in ("1", "true", "0", "false"):
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_ARGS IgnoreUnknown={quote(pairs['IgnoreUnknown'])} is not 1, 0, true or false",
        )
    if ignore in ("0", "false"):
        unknown = [key for key in pairs if key not in KNOWN_ARGS]
        if unknown:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS has unknown key {quote(unknown[0])} and no IgnoreUnknown=1 "
                f"(CNI_ARGS={quote(value)})",
            )
    return CniArgs(
        namespace=pairs.get("K8S_POD_NAMESPACE") or DEFAULT_NAMESPACE,
        pod=pairs.get("K8S_POD_NAME", ""),
        ip=pairs.get("IP", ""),
    )


def _required(env: Mapping[str, str], name: str, command: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CNIError(INVALID_ENVIRONMENT, f"{command} needs {name}, which is missing or empty")
    return value


def attachment_from_env(env: Mapping[str, str], command: str) -> Attachment:
    """The attachment from CNI_CONTAINERID and CNI_IFNAME, and for ADD and CHECK a non-empty
    CNI_NETNS (coil never enters it). Code 4 for a missing variable, a container ID outside
    ``[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}`` or an interface name Linux would refuse."""
    container_id = _required(env, "CNI_CONTAINERID", command)
    if not _valid_container_id(container_id):
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {quote(container_id)} is not a valid container ID "
            f"({_CONTAINER_ID_RULE})",
        )
    ifname = _required(env, "CNI_IFNAME", command)
    if not _valid_ifname(ifname):
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_IFNAME {quote(ifname)} is not a valid interface name ({_IFNAME_RULE})",
        )
    if command in ("ADD", "CHECK"):
        _required(env, "CNI_NETNS", command)
    return Attachment(container_id=container_id, ifname=ifname)


def valid_attachments(conf: Mapping[str, Any]) -> list[Attachment]:
    """The attachments GC must keep, from ``cni.dev/valid-attachments``.

    Code 7 if the key is missing (a GC without it would release every pod of the node), if it is
    not a list of objects with string "containerID" and "ifname", or if an entry's container ID or
    interface name breaks the rules CNI_CONTAINERID and CNI_IFNAME follow.
    """
    key = "cni.dev/valid-attachments"
    value = conf.get(key)
    if value is None:
        raise CNIError(INVALID_CONFIG, f"GC needs {key!r} in the configuration; it is missing")
    if not isinstance(value, list):
        raise CNIError(INVALID_CONFIG, f"{key} must be a list, got {_shown(value)}")
    result = []
    for index, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise CNIError(
                INVALID_CONFIG,
                f'{key} entries need string "containerID" and "ifname", got {_shown(item)}',
            )
        container_id, ifname = item["containerID"], item["ifname"]
        if not _valid_container_id(container_id):
            raise CNIError(
                INVALID_CONFIG,
                f"{key}[{index}]: containerID {quote(container_id)} is not a valid container ID "
                f"({_CONTAINER_ID_RULE})",
            )
        if not _valid_ifname(ifname):
            raise CNIError(
                INVALID_CONFIG,
                f"{key}[{index}]: ifname {quote(ifname)} is not a valid interface name "
                f"({_IFNAME_RULE})",
            )
        result.append(Attachment(container_id=container_id, ifname=ifname))
    return result


def prev_result_addresses(conf: Mapping[str, Any]) -> list[str]:
    """The addresses of ``prevResult.ips`` for CHECK; code 7 if prevResult is missing or
    malformed, or an address is not an address in CIDR form."""
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CNIError(
            INVALID_CONFIG,
            f"CHECK needs prevResult to be an object, got {_shown(prev)}",
        )
    ips = prev.get("ips", [])
    if not isinstance(ips, list) or not all(
        isinstance(ip, dict) and isinstance(ip.get("address"), str) for ip in ips
    ):
        raise CNIError(
            INVALID_CONFIG,
            f'prevResult.ips must be a list of objects with an "address", got {_shown(ips)}',
        )
    import ipaddress

    addresses = []
    for index, ip in enumerate(ips):
        address = ip["address"]
        try:
            if "/" not in address:
                raise ValueError("no prefix length")
            ipaddress.ip_interface(address)
        except ValueError:
            raise CNIError(
                INVALID_CONFIG,
                f"prevResult.ips[{index}].address {quote(address)} is not an address with a "
                "prefix length (CIDR form)",
            ) from None
        addresses.append(address)
    return addresses


def same_addresses(held: list[str], expected: list[str]) -> bool:
    """Whether two lists of CIDR addresses name the same set (spelling differences ignored)."""

    import ipaddress

    def canonical(address: str) -> str:
        try:
            return str(ipaddress.ip_interface(address))
        except ValueError:
            return address

    return sorted(map(canonical, held)) == sorted(map(canonical, expected))


def ipam_result(cni_version: str, addresses: list[Address]) -> dict[str, Any]:
    """The IPAM result for ``cni_version``: ips (with "version" before 1.0.0), a default route per
    family present, empty dns, no interfaces."""
    old = _version_key(cni_version) < (1, 0, 0)
    ips: list[dict[str, str]] = []
    families = set()
    for addr in addresses:
        family = "6" if ":" in addr.address else "4"
        families.add(family)
        ip = {"address": addr.address, "gateway": addr.gateway}
        if old:
            ip = {"version": family, **ip}
        ips.append(ip)
    routes = [
        {"dst": dst} for family, dst in (("4", "0.0.0.0/0"), ("6", "::/0")) if family in families
    ]
    return {"cniVersion": cni_version, "ips": ips, "routes": routes, "dns": {}}


def version_result() -> dict[str, Any]:
    """What VERSION prints."""
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
