"""rkt's AcceptAsk on pull (issue 13, acceptance 2): with no key trusted for an appc name
and a person at a terminal (stdin and stderr both ttys), ``fetchd pull`` shows the keys
the name's ``ac-discovery-pubkeys`` publishes and asks; "yes" trusts them for the name and
the pull goes on, "no" trusts nothing and the pull fails with the ``fetchd trust`` hint.
Real nginx over TLS, gpg keys, the CLI on a real pseudo-terminal."""

from __future__ import annotations

from pathlib import Path

from tests.support.appc import AppcSite
from tests.support.cli import Fetchd
from tests.support.pgp import PgpCases
from tests.test_pull_appc import NAME, publish, root_page
from tests.test_trust_command import PROMPT, _on_a_terminal

KEYS = "https://example.com/pubkeys.gpg"


def _argv(site: AppcSite, tmp: Path) -> list[str]:
    return ["pull", "--trust-dir", str(tmp / "trust"), *site.resolve_args(), f"{NAME}:1.0.0"]


def test_pull_asks_at_a_terminal(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site, ("ac-discovery-pubkeys", "example.com", KEYS))
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    fpr = pgp_cases.fingerprint("ed")
    stored = tmp_path / "trust/trustedkeys/prefix.d" / NAME / fpr
    env = appc_site.env()

    code, seen = _on_a_terminal(fetchd, _argv(appc_site, tmp_path), b"no\n", env=env)
    assert code == 1, seen
    assert PROMPT in seen and fpr[:4].upper().encode() in seen
    assert b"fetchd trust --prefix example.com/hello" in seen
    assert not stored.exists()
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())

    code, seen = _on_a_terminal(fetchd, _argv(appc_site, tmp_path), b"yes\n", env=env)
    assert code == 0, seen
    assert stored.is_file()
    assert b"signature verified:" in seen
