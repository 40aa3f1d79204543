"""The layout is the catalog (issue 10 items 4, 5 and export): fetchd.db is an index that
can be lost or rebuilt, sizes carry units, and export adds to an existing layout.

Real peers: the registry (its access log counts requests), nginx for a URL, skopeo and
umoci read the store and the exported layouts, stage1 runs from a store with URL records.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.images import File, Layer, build_image, push
from tests.support.nginx import Nginx, make_file, start_nginx
from tests.support.registry import Registry
from tests.support.stage1 import Stage1

HTTP = ("--insecure-options", "http")
URL_ANNOTATION = "io.fetchd.url"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class Peers:
    registry: Registry
    nginx: Nginx
    a: str  # registry references, without docker://
    b: str
    url: str
    url_digest: str
    source: Path  # the OCI layout the images were pushed from


@pytest.fixture(scope="module")
def peers(
    registry: Registry, busybox_layer: Layer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peers]:
    layout = tmp_path_factory.mktemp("catalog") / "layout"
    build_image(
        layout,
        "a",
        [busybox_layer, Layer([File("etc/which", b"a\n")])],
        config={"Cmd": ["/bin/cat", "/etc/which"]},
    )
    build_image(layout, "b", [busybox_layer, Layer([File("etc/which", b"b\n")])])
    a, b = f"{registry.host}/catalog/a:1", f"{registry.host}/catalog/b:1"
    push(layout, "a", a)
    push(layout, "b", b)
    root = tmp_path_factory.mktemp("www")
    digest = make_file(root / "blob.bin", 300_000, seed=10)
    with start_nginx(tmp_path_factory.mktemp("nginx"), root) as nginx:
        yield Peers(registry, nginx, a, b, f"{nginx.url}/blob.bin", digest, layout)


def listed(fetchd: Fetchd) -> dict[str, tuple[str, int]]:
    """name → (digest, size) as ``images --json`` shows them."""
    doc: Any = json.loads(ok(fetchd("images", "--json")))
    rows = doc["images"] if isinstance(doc, dict) else doc
    return {r["name"]: (r["digest"], r["size"]) for r in rows}


def fsck_clean(fetchd: Fetchd) -> None:
    assert "ok" in ok(fetchd("fsck")).splitlines()[-1]


def drop_db(fetchd: Fetchd) -> None:
    for suffix in ("", "-wal", "-shm"):
        (fetchd.store / f"fetchd.db{suffix}").unlink(missing_ok=True)


def skopeo_digest(layout: Path, name: str) -> str:
    r = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{name}"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["Digest"])


def test_losing_fetchd_db_loses_no_name_and_no_content(
    peers: Peers, fetchd: Fetchd, tmp_path: Path
) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}", peers.url))
    (rec,) = [m for m in fetchd.index()["manifests"] if URL_ANNOTATION in m.get("annotations", {})]
    assert rec == {
        "mediaType": "application/octet-stream",
        "digest": peers.url_digest,
        "size": 300_000,
        "annotations": {URL_ANNOTATION: peers.url},  # no ref.name: no image name for skopeo
    }
    # The ecosystem does not trip over the URL record: skopeo, umoci, stage1.
    digest = skopeo_digest(fetchd.store / "layout", peers.a)
    assert digest == fetchd.entry(peers.a)["digest"]
    image = f"{fetchd.store}/layout:{peers.a}"
    r = subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", image, str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bundle/rootfs/etc/which").read_bytes() == b"a\n"
    run = Stage1(fetchd.store).run("run", peers.a)
    assert (run.returncode, run.stdout) == (0, "a\n"), run.stderr

    before = listed(fetchd)
    blobs = fetchd.blobs()
    assert set(before) == {peers.a, peers.url}
    drop_db(fetchd)

    assert listed(fetchd) == before
    ok(fetchd("gc"))
    assert fetchd.blobs() == blobs  # nothing a name or a URL record uses is gone
    asked = (len(peers.registry.requests()), len(peers.nginx.requests()))
    for ref in (f"docker://{peers.a}", peers.url):
        assert ok(fetchd("pull", *HTTP, "--pull-policy", "new", ref)).split()[-1] in (
            digest,
            peers.url_digest,
        )
    assert (len(peers.registry.requests()), len(peers.nginx.requests())) == asked
    assert (fetchd.store / "fetchd.db").exists()  # rebuilt by the first write
    assert listed(fetchd) == before
    fsck_clean(fetchd)
    # update still asks (no validators left: the whole file), and still one record
    gets = len(peers.nginx.requests("/blob.bin"))
    ok(fetchd("pull", *HTTP, "--pull-policy", "update", peers.url))
    assert len(peers.nginx.requests("/blob.bin")) > gets
    urls = [m for m in fetchd.index()["manifests"] if URL_ANNOTATION in m.get("annotations", {})]
    assert len(urls) == 1


def test_a_corrupt_db_is_rebuilt_from_the_layout(peers: Peers, fetchd: Fetchd) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}", peers.url))
    before = listed(fetchd)
    blobs = fetchd.blobs()
    drop_db(fetchd)
    (fetchd.store / "fetchd.db").write_bytes(b"this is not sqlite" * 100)

    r = fetchd("images")  # reads: the layout still knows, with a word about the index
    assert r.returncode == 0 and peers.a in r.stdout and peers.url in r.stdout, r.stderr
    assert "fsck --rebuild-db" in r.stderr
    ok(fetchd("gc"))  # a write: the corrupt index is set aside and rebuilt
    assert fetchd.blobs() == blobs
    assert (fetchd.store / "fetchd.db.corrupt").read_bytes().startswith(b"this is not")
    assert listed(fetchd) == before

    out = ok(fetchd("fsck", "--rebuild-db"))
    assert "rebuilt" in out and out.splitlines()[-1].endswith("ok"), out
    r = fetchd("images")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_url_only_the_db_knows_is_kept_and_moved_into_the_layout(
    peers: Peers, fetchd: Fetchd
) -> None:
    """A store written before the catalog: the URL is recorded only in fetchd.db."""
    ok(fetchd("pull", *HTTP, peers.url))
    index = fetchd.index()
    index["manifests"] = []
    (fetchd.store / "layout/index.json").write_text(json.dumps(index))
    ok(fetchd("gc"))
    assert peers.url_digest in fetchd.blobs()
    (rec,) = fetchd.index()["manifests"]
    assert rec["annotations"] == {URL_ANNOTATION: peers.url}
    ok(fetchd("rm", peers.url))
    assert fetchd.index()["manifests"] == []
    ok(fetchd("gc"))
    assert peers.url_digest not in fetchd.blobs()


@pytest.mark.parametrize(
    ("size", "says"),
    [
        ("1", "has no unit; add one"),
        ("-1", "negative"),
        ("0", "has no unit; add one"),
        ("0M", "above zero"),
        ("10X", "is not a size"),
    ],
)
def test_gc_max_size_refuses_what_would_evict_everything(
    peers: Peers, fetchd: Fetchd, size: str, says: str
) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}"))
    index = (fetchd.store / "layout/index.json").read_bytes()
    blobs = fetchd.blobs()
    r = fetchd("gc", "--max-size", size)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last and "Traceback" not in r.stderr, last
    assert (fetchd.store / "layout/index.json").read_bytes() == index
    assert fetchd.blobs() == blobs
    fsck_clean(fetchd)


def test_sizes_take_units(peers: Peers, fetchd: Fetchd) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}", f"docker://{peers.b}"))
    index = (fetchd.store / "layout/index.json").read_bytes()
    assert "evicted" not in ok(fetchd("gc", "--max-size", "10M"))  # ~1 MiB stored
    assert (fetchd.store / "layout/index.json").read_bytes() == index
    for size in ("10MiB", "10MB", "0.5G", "1.5T", "20 G"):
        ok(fetchd("gc", "--max-size", size))
    # 1 KiB holds neither image: both evicted (an explicit unit is the user's wish)
    out = ok(fetchd("gc", "--max-size", "1K"))
    assert out.count("evicted") == 2, out
    assert fetchd.index()["manifests"] == []
    r = fetchd("serve", "--upstream", "http://127.0.0.1:1", "--max-size", "500", timeout=60)
    assert r.returncode == 2 and "has no unit" in r.stderr, r.stderr


def test_gc_max_size_evicts_images_and_urls_by_last_use(peers: Peers, fetchd: Fetchd) -> None:
    """URLs took part in LRU eviction as if never used: any URL went before any image."""
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}"))  # ~1 MiB, used first
    ok(fetchd("pull", *HTTP, "--digest", peers.url_digest, peers.url))  # 300 kB, used last
    out = ok(fetchd("gc", "--max-size", "500K"))
    assert out.count("evicted") == 1 and peers.a in out, out
    assert [m["annotations"].get("io.fetchd.url") for m in fetchd.index()["manifests"]] == [
        peers.url
    ]


def test_gc_says_what_stage1_gc_would_free_and_leaves_trees_alone(
    peers: Peers, fetchd: Fetchd
) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}"))
    trees = fetchd.store / "trees"
    kept = trees / fetchd.entry(peers.a)["digest"].split(":")[1]
    stale = trees / hashlib.sha256(b"an image no longer named").hexdigest()
    for tree in (kept, stale):
        (tree / "usr").mkdir(parents=True)
        (tree / "usr/big").write_bytes(os.urandom(1 << 20))
    os.link(stale / "usr/big", stale / "usr/big-again")  # counted once
    trees.chmod(0o700)
    out = ok(fetchd("gc"))
    line = [ln for ln in out.splitlines() if "stage1 gc" in ln]
    assert line == ["stage1 gc would free 1 trees (1.0 MiB) in trees/"], out
    assert kept.is_dir() and stale.is_dir()


def test_export_adds_to_an_existing_layout(peers: Peers, fetchd: Fetchd, tmp_path: Path) -> None:
    ok(fetchd("pull", *HTTP, f"docker://{peers.a}", f"docker://{peers.b}"))
    dest = tmp_path / "exported"
    # A layout another tool made, with an image of its own
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{peers.source}:a", f"oci:{dest}:theirs"],
        check=True,
        timeout=60,
    )
    ok(fetchd("export", f"docker://{peers.a}", str(dest)))
    ok(fetchd("export", peers.b, str(dest)))
    ok(fetchd("export", peers.a, str(dest)))  # again: replaced, not doubled
    names = [
        m["annotations"][REF_NAME]
        for m in json.loads((dest / "index.json").read_text())["manifests"]
    ]
    assert sorted(names) == sorted(["theirs", peers.a, peers.b])
    for name, entry in ((peers.a, fetchd.entry(peers.a)), (peers.b, fetchd.entry(peers.b))):
        assert skopeo_digest(dest, name) == entry["digest"]
    assert skopeo_digest(dest, "theirs") == fetchd.entry(peers.a)["digest"]

    # A .tar is one image, as before
    tar = tmp_path / "one.tar"
    ok(fetchd("export", peers.b, str(tar)))
    with tarfile.open(tar) as t:
        index = json.load(t.extractfile("index.json"))  # type: ignore[arg-type]
    assert [m["annotations"][REF_NAME] for m in index["manifests"]] == [peers.b]

    # An index.json fetchd cannot read is never replaced
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_bytes(b"{not json")
    failed(fetchd("export", peers.a, str(bad)), "index.json is not valid JSON")
    assert (bad / "index.json").read_bytes() == b"{not json"
    assert sorted(p.name for p in bad.iterdir()) == ["index.json"]
