"""The image config (and the descriptors and references) as stage1 reads them.

First stage1 itself against hostile configs: each ends with exit status 1 and one line
``error: …`` naming the image and what is wrong, never "internal error". Then properties
(hypothesis) of the parsers in stage1.model: any input gives a value or stage1's own
error, never another exception.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1.errors import InvalidImageConfig, Stage1Error
from stage1.model import Descriptor, Digest, ImageConfig, Reference
from tests.support.stage1 import (
    RUN_TIMEOUT,
    Stage1,
    app_layer,
    check_error,
    image,
    image_with_raw_config,
)

REF = "127.0.0.1:5000/stage1/hostile:latest"
DEEP = 100_000


def _config(**fields: Any) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": fields}).encode()


HOSTILE: dict[str, tuple[bytes, str]] = {
    "nul in Env": (_config(Env=["A=b\0c"], Cmd=["/bin/true"]), "Env entry 'A=b\\x00c' has a NUL"),
    "nul in Cmd": (_config(Cmd=["/bin/echo", "a\0b"]), "Cmd entry 'a\\x00b' has a NUL byte"),
    "nul in argv[0]": (_config(Cmd=["/bin/e\0cho"]), "Cmd entry '/bin/e\\x00cho' has a NUL"),
    "nul in Entrypoint": (_config(Entrypoint=["/bin/sh\0"]), "Entrypoint entry '/bin/sh\\x00'"),
    "nul in WorkingDir": (
        _config(WorkingDir="/a\0b", Cmd=["/bin/true"]),
        "WorkingDir '/a\\x00b' has a NUL byte",
    ),
    "nul in User": (_config(User="ro\0ot", Cmd=["/bin/true"]), "User 'ro\\x00ot' has a NUL byte"),
    "Env without =": (_config(Env=["JUSTANAME"], Cmd=["/bin/true"]), "'JUSTANAME' is not NAME=V"),
    "Env with an empty name": (_config(Env=["=x"], Cmd=["/bin/true"]), "'=x' is not NAME=VALUE"),
    "a lone surrogate": (_config(Cmd=["/bin/echo", "\ud800"]), "is not valid text"),
    "WorkingDir a list": (
        b'{"config": {"WorkingDir": ' + b"[" * 900 + b"]" * 900 + b', "Cmd": ["/bin/true"]}}',
        "WorkingDir is a list, not a string",
    ),
    "Cmd a string": (_config(Cmd="/bin/true"), "Cmd is '/bin/true', not a list of strings"),
    "Env a number": (_config(Env=[1], Cmd=["/bin/true"]), "Env has 1, not a string"),
    "config a list": (b'{"config": []}', "config is not an object"),
    "a string too long for execve": (_config(Cmd=["x" * (128 << 10)]), "longer than 131071"),
    "too many strings": (_config(Env=["A=b"] * 200_000, Cmd=["/bin/true"]), "larger than"),
    "deeply nested config": (
        b'{"config": {"Env": ' + b"[" * DEEP + b"]" * DEEP + b"}}",
        "is JSON nested too deeply; it needs a corrected image",
    ),
}


def _run_all(stage1: Stage1, refs: list[str]) -> dict[str, str]:
    """stage1 run of each of REFS, all at once; ref -> the one error line."""
    procs = {
        ref: subprocess.Popen(
            stage1.argv("run", ref),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ref in refs
    }
    lines = {}
    try:
        for ref, proc in procs.items():
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            assert "Traceback" not in err, err
            lines[ref] = check_error(result)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return lines


def test_hostile_configs_are_each_one_clear_error(stage1: Stage1) -> None:
    refs = {f"{REF}-{i}": case for i, case in enumerate(HOSTILE)}
    for ref, case in refs.items():
        # No layers: the config is read (and refused) before anything is rendered.
        image_with_raw_config(stage1, ref, HOSTILE[case][0], base=False)
    wrong = {}
    for ref, line in _run_all(stage1, list(refs)).items():
        reason = HOSTILE[refs[ref]][1]
        prefix = f"error: image {ref} cannot be run: "
        # The offending value is quoted short, never whole.
        if not line.startswith(prefix) or reason not in line or len(line) > 600:
            wrong[refs[ref]] = line
    assert wrong == {}


def test_user_that_is_almost_a_number_is_a_clear_error(stage1: Stage1) -> None:
    users = {f"{REF}-{i}": user for i, user in enumerate(["²", "١٢", "0:²", "9" * 20])}
    for ref, user in users.items():
        image(stage1, ref, [app_layer()], base=False, config={"User": user, "Cmd": ["/x"]})
    for ref, line in _run_all(stage1, list(users)).items():
        assert line.startswith(f"error: image {ref}: "), (users[ref], line)
        assert "internal error" not in line


def test_uid_option_that_is_almost_a_number_is_a_usage_error(stage1: Stage1) -> None:
    check_error(stage1.run("run", "--uid", "²", REF), status=2)


@pytest.mark.parametrize("command", [("gc",), ("run", REF)])
def test_a_deeply_nested_index_json_is_one_clear_error(
    stage1: Stage1, command: tuple[str, ...]
) -> None:
    stage1.layout.mkdir(parents=True)
    stage1.trees.mkdir(mode=0o700)  # gc with no trees/ has nothing to do and reads nothing
    (stage1.layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (stage1.layout / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    line = check_error(stage1.run(*command))
    assert "index.json" in line and "nested too deeply" in line, line


# --- properties ---------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_text = st.text(max_size=12) | st.sampled_from(
    ["", "\0", "A=b", "=", "/bin/sh", "\ud800", "sha256:" + "a" * 64, "²", "x" * 200]
)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_fields = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User")
_string_lists = st.lists(_text, max_size=5)
# Configs close to real ones (each field right or wrong), and anything at all.
_configs = st.fixed_dictionaries(
    {}, optional={f: _string_lists | _text | _json for f in _fields}
) | st.dictionaries(st.sampled_from(_fields) | _text, _json, max_size=5)
_raw_configs = st.fixed_dictionaries({"config": _configs}) | _json


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@SETTINGS
@given(_raw_configs)
def test_image_config_parse_returns_a_value_or_its_own_error(raw: Any) -> None:
    try:
        config = ImageConfig.parse(raw, "manifest sha256:x")
    except InvalidImageConfig as exc:
        assert len(str(exc)) < 300
        return
    # What it returns, execve(2) and chdir(2) can take.
    for value in (*config.entrypoint, *config.cmd, *config.env, config.working_dir, config.user):
        assert isinstance(value, str) and "\0" not in value
        os.fsencode(value)
    assert all(e.partition("=")[0] and "=" in e for e in config.env)


def test_image_config_parse_of_nesting_as_deep_as_json_loads_goes() -> None:
    # json.loads stops near the recursion limit; what it returns must not recurse in parse.
    for field in _fields:
        with pytest.raises(InvalidImageConfig):
            ImageConfig.parse({"config": {field: _nested(990)}}, "manifest sha256:x")
    with pytest.raises(RecursionError):  # the CLI names the image for this one
        json.loads("[" * DEEP + "]" * DEEP)


_descriptors = (
    st.fixed_dictionaries(
        {},
        optional={
            "digest": st.sampled_from(["sha256:" + "0" * 64, "sha512:" + "f" * 128]) | _json,
            "size": st.integers(min_value=-1, max_value=2**70) | _json,
            "mediaType": _text | _json,
            "annotations": st.dictionaries(_text, _text | _json, max_size=3) | _json,
            "platform": st.fixed_dictionaries(
                {}, optional={k: _text | _json for k in ("os", "architecture", "variant")}
            )
            | _json,
        },
    )
    | _json
)


@SETTINGS
@given(_descriptors)
def test_descriptor_parse_returns_a_value_or_its_own_error(raw: Any) -> None:
    try:
        desc = Descriptor.parse(raw, "index.json")
    except Stage1Error as exc:
        assert len(str(exc)) < 300
        return
    assert isinstance(desc.digest, Digest) and 0 <= desc.size < 2**63
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in desc.annotations)


@SETTINGS
@given(_text | st.text(max_size=200))
def test_reference_parse_returns_a_value_or_its_own_error(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except Stage1Error:
        return
    assert ref.name is not None or ref.digest is not None
    assert all(isinstance(name, str) for name in ref.candidates())


@SETTINGS
@given(_json)
def test_digest_parse_returns_a_value_or_value_error(text: Any) -> None:
    # Its callers (Descriptor.parse, Reference.parse) translate the ValueError.
    try:
        digest = Digest.parse(text)
    except ValueError:
        return
    assert str(digest) == text
