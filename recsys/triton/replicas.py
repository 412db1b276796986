"""Which Triton servers serve the platform's models: one, or replicas of one repository.

A shop that outgrows one machine runs several Triton replicas behind a load balancer (Envoy in
``docker-compose.yaml``, a Service in ``deploy/k8s``). Clients keep calling one address (the
balancer: ``RECSYS_TRITON_HOST``), but deploys, rollbacks and the monitor must talk to *every*
replica: a version is only served once each replica has loaded it and answered its smoke query,
and a replica that misbehaves must be named on its own.

``RECSYS_TRITON_REPLICAS`` lists them, comma-separated, each
``[name=]host:grpc_port:metrics_port``::

    RECSYS_TRITON_REPLICAS=a=10.0.0.5:8001:8002,b=10.0.0.6:8001:8002

An entry ``dns+host:grpc_port:metrics_port`` stands for every address ``host`` resolves to, looked
up each time the list is used: Docker's DNS answers a compose service name with one address per
replica (``deploy.replicas``), and a Kubernetes headless Service with one per ready pod, so
scaling needs no configuration change. Such replicas are named ``host/address``.

Unset, the platform has one replica: ``RECSYS_TRITON_HOST`` with ``RECSYS_TRITON_GRPC_PORT`` and
``RECSYS_TRITON_METRICS_PORT`` (the embedded stack, and every single-server deployment).

All replicas read the same model repository (a shared volume), so a version folder is published
once and loaded everywhere.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

REPLICAS_ENV = "RECSYS_TRITON_REPLICAS"
DNS_PREFIX = "dns+"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@/-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class ReplicaSpecError(ValueError):
    """``RECSYS_TRITON_REPLICAS`` (or a replica list given in code) is malformed; the message
    names the entry and what is wrong with it."""


class ReplicaDiscoveryError(RuntimeError):
    """A ``dns+`` entry could not be resolved to any address (the name is unknown, or DNS is
    down): no replica can be reached, so nothing may be deployed or judged."""


@dataclass(frozen=True)
class TritonReplica:
    """One Triton server: where its gRPC (model control, smoke queries) and metrics listen."""

    name: str
    host: str
    grpc_port: int
    metrics_port: int

    @property
    def grpc_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.metrics_port}/metrics"


@dataclass(frozen=True)
class ReplicaEntry:
    """One parsed entry of the list: a replica, or a DNS name standing for several."""

    name: str | None
    host: str
    grpc_port: int
    metrics_port: int
    dns: bool = False


def _port(value: str, entry: str, what: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ReplicaSpecError(
            f"{REPLICAS_ENV} entry {entry!r}: {what} port must be 1-65535, got {value!r}"
        )
    return port


def _host(value: str, entry: str) -> str:
    host = value.strip("[]")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOST.match(host):
        raise ReplicaSpecError(f"{REPLICAS_ENV} entry {entry!r}: {value!r} is not a host name")
    return host


def parse_entry(raw: str) -> ReplicaEntry:
    """One ``[name=]host:grpc:metrics`` or ``dns+host:grpc:metrics`` entry."""
    entry = raw.strip()
    name: str | None = None
    rest = entry
    dns = rest.startswith(DNS_PREFIX)
    if dns:
        rest = rest[len(DNS_PREFIX) :]
    elif "=" in rest:
        name, rest = (part.strip() for part in rest.split("=", 1))
        if not _NAME.match(name):
            raise ReplicaSpecError(
                f"{REPLICAS_ENV} entry {entry!r}: replica name {name!r} must be 1-63 letters, "
                "digits or _.@/- (it names the replica in alerts and audit records)"
            )
    host, sep, ports = rest.rpartition(":")
    host, sep2, grpc = host.rpartition(":")
    if not sep or not sep2 or not host:
        raise ReplicaSpecError(
            f"{REPLICAS_ENV} entry {entry!r} is not [name=]host:grpc_port:metrics_port "
            "or dns+host:grpc_port:metrics_port"
        )
    return ReplicaEntry(
        name=name,
        host=_host(host, entry),
        grpc_port=_port(grpc, entry, "gRPC"),
        metrics_port=_port(ports, entry, "metrics"),
        dns=dns,
    )


def parse_replicas(spec: str) -> tuple[ReplicaEntry, ...]:
    """Every entry of a ``RECSYS_TRITON_REPLICAS`` value (empty: no entries). Duplicate names
    or endpoints are refused: the same server twice would load every version twice and count
    its traffic twice."""
    entries = tuple(parse_entry(part) for part in spec.split(",") if part.strip())
    if spec.strip() and not entries:
        raise ReplicaSpecError(f"{REPLICAS_ENV}={spec!r} lists no replica")
    names = [e.name or f"{e.host}:{e.grpc_port}" for e in entries if not e.dns]
    endpoints = [(e.host, e.grpc_port) for e in entries]
    for what, values in (("name", names), ("endpoint", endpoints)):
        seen = {value for value in values if values.count(value) > 1}
        if seen:
            raise ReplicaSpecError(f"{REPLICAS_ENV} lists the same {what} twice: {sorted(seen)}")
    return entries


def resolve_entries(entries: tuple[ReplicaEntry, ...]) -> list[TritonReplica]:
    """The replicas the entries stand for now: ``dns+`` entries are looked up (one replica per
    address, sorted so every caller sees the same order); a name that resolves to nothing
    raises :class:`ReplicaDiscoveryError`."""
    replicas: list[TritonReplica] = []
    for entry in entries:
        if not entry.dns:
            name = entry.name or f"{entry.host}:{entry.grpc_port}"
            replicas.append(TritonReplica(name, entry.host, entry.grpc_port, entry.metrics_port))
            continue
        try:
            infos = socket.getaddrinfo(entry.host, entry.grpc_port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ReplicaDiscoveryError(
                f"{REPLICAS_ENV}: cannot resolve {entry.host!r} to Triton replicas ({exc})"
            ) from exc
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise ReplicaDiscoveryError(f"{REPLICAS_ENV}: {entry.host!r} resolves to no address")
        replicas.extend(
            TritonReplica(f"{entry.host}/{address}", address, entry.grpc_port, entry.metrics_port)
            for address in addresses
        )
    seen: set[tuple[str, int]] = set()
    unique = []
    for replica in replicas:  # a dns+ name may resolve to an address also listed by hand
        if (replica.host, replica.grpc_port) not in seen:
            seen.add((replica.host, replica.grpc_port))
            unique.append(replica)
    return unique


def describe(replicas: list[TritonReplica]) -> str:
    """``a (127.0.0.1:8001), b (...)`` for messages."""
    return ", ".join(f"{r.name} ({r.grpc_url})" for r in replicas)


def format_entries(entries: tuple[ReplicaEntry, ...]) -> str:
    """The ``RECSYS_TRITON_REPLICAS`` text of ``entries`` (what a deferred monitor carries to
    the triggerer, which resolves ``dns+`` names again at every check)."""
    parts = []
    for entry in entries:
        prefix = DNS_PREFIX if entry.dns else (f"{entry.name}=" if entry.name else "")
        parts.append(f"{prefix}{entry.host}:{entry.grpc_port}:{entry.metrics_port}")
    return ",".join(parts)


def metrics_targets(spec: str) -> dict[str, str]:
    """``{replica name: metrics URL}`` for a ``RECSYS_TRITON_REPLICAS`` value, resolved now."""
    return {replica.name: replica.metrics_url for replica in resolve_entries(parse_replicas(spec))}
