"""The LAN rig of issue 12 (tests/support/lan.py) and docker-compose.test.yml's same topology.

The rig tests need root (network namespaces, tc) and skip with the reason otherwise. They
create namespaces named fd-<pid>x<n>-* only, and check that none of them is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import lan as lanmod
from tests.support.lan import Lan
from tests.support.procs import wait_until

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.test.yml"
MIB = 1024 * 1024


def _skip_reason() -> str | None:
    return lanmod.unavailable()


needs_rig = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def lan3() -> Iterator[Lan]:
    with Lan(3, "200mbit") as lan:
        yield lan
    assert lan.names() == [], "the rig left namespaces behind"


@needs_rig
def test_hosts_reach_each_other_and_nothing_else(lan3: Lan) -> None:
    for a in range(4):
        for b in range(4):
            if a != b:
                assert lan3.reaches(a, lan3.addr(b)), f"host {a} does not reach host {b}"
    for i in range(4):
        assert lan3.run(i, ["ip", "route", "show", "default"]).stdout.strip() == ""
        # no route out: neither the root namespace's networks nor anything beyond
        out = lan3.run(i, ["ip", "route", "get", "1.1.1.1"])
        assert out.returncode != 0 and "unreachable" in out.stderr
    assert not lan3.reaches(1, "10.231.21.1")  # another subnet: no route


@needs_rig
def test_every_link_is_shaped_both_ways(lan3: Lan) -> None:
    want = lanmod.rate_bps("200mbit") // 8  # tc -j reports bytes per second
    for i in range(4):
        tbfs = [q for q in lan3.qdiscs(i) if q["kind"] == "tbf" and q.get("root")]
        assert sorted(q["where"] for q in tbfs) == ["host", "switch"]
        for q in tbfs:
            assert q["options"]["rate"] == want
            assert q["options"]["burst"] == max(want * 4 // 1000, 64 * 1024)


@needs_rig
def test_a_transfer_between_hosts(lan3: Lan, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    payload = os.urandom(4 * MIB)
    (www / "blob").write_bytes(payload)
    os.chmod(tmp_path, 0o755)
    server = lan3.popen(
        0,
        [sys.executable, "-m", "http.server", "--bind", lan3.addr(0), "8080", "-d", str(www)],
        stdout=open(tmp_path / "server.log", "wb"),  # noqa: SIM115 - the child holds it
        stderr=open(tmp_path / "server.err", "wb"),  # noqa: SIM115
    )
    lan3.wait_tcp(1, lan3.addr(0), 8080)
    before = lan3.egress_bytes(0)
    out = tmp_path / "got"
    done = lan3.run(
        1, ["curl", "-sS", "--fail", "-o", str(out), f"http://{lan3.addr(0)}:8080/blob"], 60
    )
    assert done.returncode == 0, done.stderr
    sent = lan3.egress_bytes(0) - before
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    # the body plus TCP/IP headers (~3 %), and nothing like a second copy
    assert 4 * MIB <= sent <= 4.5 * MIB, sent
    assert lan3.stop(server) is not None


@needs_rig
def test_teardown_removes_everything_it_made() -> None:
    lan = Lan(1, "1gbit", cache_uplink="100mbit")
    with lan:
        names = set(lan.names())
        assert names == {lan.switch, lan.ns(0), lan.ns(1)}
        assert all(n.startswith("fd-") for n in names)
        rates = {q["options"]["rate"] for q in lan.qdiscs(0) if q["kind"] == "tbf"}
        assert rates == {100_000_000 // 8}
        rates = {q["options"]["rate"] for q in lan.qdiscs(1) if q["kind"] == "tbf"}
        assert rates == {1_000_000_000 // 8}
        # a process of the rig, and one it started that the rig never saw (a grandchild)
        lan.popen(1, ["sleep", "300"])
        parent = lan.popen(0, ["bash", "-c", "sleep 300 & exec sleep 301"])
        wait_until(lambda: len(lan.pids_in(lan.ns(0))) == 2, 10, "both sleeps in h0")
        (grandchild,) = set(lan.pids_in(lan.ns(0))) - {parent.pid}
    assert lan.names() == []
    wait_until(lambda: not Path(f"/proc/{grandchild}").exists() or _zombie(grandchild), 10,
               "the grandchild to end")  # fmt: skip


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


# --- docker-compose.test.yml -------------------------------------------------------------------


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file, written as JSON-compatible YAML (YAML 1.2 is a superset of JSON):
    full-line `#` comments, then one JSON document. Every YAML parser (docker compose's
    too) reads it as this json.loads does, so the test needs no YAML library."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    doc = json.loads("\n".join(lines))
    assert isinstance(doc, dict)
    return doc


def _script(service: dict[str, Any]) -> str:
    parts = [*service.get("entrypoint", []), *service.get("command", [])]
    return " ".join(parts)


def test_compose_describes_the_rig() -> None:
    doc = load_compose()
    services: dict[str, Any] = doc["services"]
    networks: dict[str, Any] = doc["networks"]
    assert list(networks) == ["lan"]
    subnet = networks["lan"]["ipam"]["config"][0]["subnet"]
    assert subnet == f"{lanmod.SUBNET}.0/{lanmod.PREFIX_LEN}"

    cache = services["cache"]
    hosts = {k: v for k, v in services.items() if re.fullmatch(r"host\d+", k)}
    assert len(hosts) >= 3
    assert sorted(int(k[4:]) for k in hosts) == list(range(1, len(hosts) + 1))

    # one cache running `fetchd serve`, at host 0's address of the rig
    assert cache["networks"]["lan"]["ipv4_address"] == lanmod.address(0)
    script = _script(cache)
    assert re.search(r"\bexec fetchd\b.*\bserve\b.*--listen 0\.0\.0\.0:5050", script), script
    assert cache["healthcheck"]["test"]
    for name, svc in services.items():
        if name == "cache" or name in hosts:
            continue
        assert "fetchd serve" not in _script(svc), f"{name}: a second cache"

    rate = lanmod.DEFAULT_RATE
    for name, svc in {"cache": cache, **hosts}.items():
        script = _script(svc)
        # the link rate, set in the entrypoint with tc as the rig does (tbf, 20 ms queue)
        tc = re.search(r"\btc qdisc replace dev eth0 root tbf (.*?)(;|&&|\n|$)", script)
        assert tc, f"{name}: no tbf in the entrypoint"
        opts = shlex.split(tc[1])
        assert opts[opts.index("rate") + 1] == rate, name
        assert opts[opts.index("latency") + 1] == lanmod.QUEUE, name
        assert int(opts[opts.index("burst") + 1]) == lanmod.burst_bytes(rate), name
        assert "NET_ADMIN" in svc["cap_add"], name
    for name, svc in hosts.items():
        i = int(name[4:])
        assert svc["networks"]["lan"]["ipv4_address"] == lanmod.address(i)
        assert svc["depends_on"]["cache"]["condition"] == "service_healthy"
        pull = re.search(r"\bfetchd\b[^\n;]*\bpull\b[^\n;]*", _script(svc))
        assert pull, f"{name}: no fetchd pull"
        argv = shlex.split(pull[0].replace("\\\n", " "))
        assert "--torrent" in argv, name
        assert argv[argv.index("--mirror") + 1] == "http://cache:5050", name
