"""Pure logic of the admin plane: the per-batch client summary, name and
address checks, and secrets kept out of reprs."""

from __future__ import annotations

from typing import Any

import pytest

from detectors import DetectorScore
from gateway.admin.deps import require_role
from gateway.admin.sessions import login_bucket, source_label
from gateway.admin.users import Enrollment, User, check_password, check_username
from gateway.batch import BatchItem
from gateway.clientview import _aggregate
from gateway.errors import PolicyError
from gateway.keys import ApiKey
from gateway.policy import Verdict


def _item(
    client: str | None,
    action: str = "allow",
    risk: float | None = None,
    reasons: tuple[str, ...] = (),
    scores: dict[str, float] | None = None,
) -> BatchItem:
    key = None
    if client is not None:
        key = ApiKey("mgk_000000000001", client, b"s" * 32, (), "active", 0)
    item = BatchItem("t", 0, 0, b"", client or "", None, key=key, action=action)
    if risk is not None:
        flagged = (DetectorScore("similarity", 0.9, 0.5, True, "near", True),)
        item.verdict = Verdict(action, action, risk, flagged, reasons)
    item.scores = scores or {}
    return item


def test_batch_summary_takes_the_worst_of_each_client() -> None:
    refused = _item("a", action="block")
    refused.error = PolicyError("blocked", code="BLOCKED")
    items = [
        _item("a", risk=0.2, scores={"ood": 0.1, "similarity": 0.2}),
        _item(
            "a",
            action="flag",
            risk=1.2,
            reasons=("similarity: 9/10 near",),
            scores={"similarity": 0.6},
        ),
        refused,
        _item("b", risk=0.1, scores={"ood": 0.3}),
        _item(None),  # unauthenticated: nobody to attribute it to
    ]
    summary = _aggregate(items)

    assert set(summary) == {"a", "b"}
    a = summary["a"]
    assert (a.requests, a.action, a.risk) == (3, "block", 1.2)
    assert a.scores == {"ood": 0.1, "similarity": 0.6}
    assert a.evidence == ["similarity: 9/10 near"]
    assert a.codes == {"BLOCKED": 1}
    assert summary["b"].action == "allow" and summary["b"].risk == 0.1


def test_refused_before_scoring_has_no_risk() -> None:
    item = _item("c", action="throttle")
    assert _aggregate([item])["c"].risk is None


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "::1"),
        (None, "unknown"),
        ("}evil{", "unknown"),
        ("a" * 100, "unknown"),
        # One spelling per address: the per-source limit cannot be dodged by
        # writing an address another way.
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("10.0.0.1.", "unknown"),
        ("1:2:3", "unknown"),
    ],
)
def test_source_label_is_safe_in_key_names(address: str | None, label: str) -> None:
    assert source_label(address) == label


def test_an_ipv6_hosts_logins_count_per_64() -> None:
    assert login_bucket("2001:db8::1") == login_bucket("2001:db8::ffff:1")
    assert login_bucket("2001:db8::1") == "2001:db8::/64"
    assert login_bucket("2001:db8:0:1::1") != login_bucket("2001:db8::1")
    assert login_bucket("10.0.0.1") == "10.0.0.1"


@pytest.mark.parametrize("name", ["", "Root", "a:b", "{x}", "a" * 65, "1abc"])
def test_bad_user_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_username(name)


def test_short_password_is_refused() -> None:
    with pytest.raises(ValueError):
        check_password("short")


def test_enrollment_repr_hides_the_secret() -> None:
    enrollment = Enrollment(
        User("a", "viewer", False, 0), "otpauth://totp/x?secret=SECRETSECRET"
    )
    assert "SECRETSECRET" not in repr(enrollment)
    assert "SECRETSECRET" not in repr(
        ApiKey("k", "c", b"SECRETSECRET", (), "active", 0)
    )


def test_unknown_role_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        require_role("root")  # type: ignore[arg-type]


def test_view_and_history_writes_follow_changes_or_the_interval() -> None:
    from gateway.clientview import _due

    assert _due(None, "allow", 0.0, 10.0)
    assert not _due((0.0, "allow"), "allow", 5.0, 10.0)
    assert _due((0.0, "allow"), "allow", 10.0, 10.0)
    # A change of action is written at once; a repeated one waits.
    assert _due((0.0, "allow"), "block", 1.0, 10.0)
    assert not _due((0.0, "block"), "block", 1.0, 10.0)


@pytest.mark.parametrize("body", [b'{"user": "olga", "password": ', b"\xff\xfe{}"])
async def test_an_unparsable_body_is_malformed_not_invalid(body: bytes) -> None:
    # docs/admin.md: a body that cannot be parsed is 400 MALFORMED_REQUEST;
    # 422 SCHEMA_INVALID is for JSON of the wrong shape. The front door makes
    # the same distinction (MALFORMED_JSON). No lifespan runs: the body is
    # refused before the route, which would need the stores.
    import httpx

    from gateway.admin.app import create_app
    from gateway.config import load_settings

    app = create_app(load_settings())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post(
            "/v1/sessions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "MALFORMED_REQUEST"


async def test_an_oversize_body_is_refused_before_it_is_read() -> None:
    # The login route takes bodies from anyone: without a limit a 400 MB
    # body was read whole (over 1 GB resident) before the schema refused it.
    import httpx

    from gateway.admin.app import create_app
    from gateway.config import load_settings

    settings = load_settings(admin={"max_body_bytes": 4096})
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    json_type = {"Content-Type": "application/json"}
    big = b'{"user": "' + b"a" * 5000 + b'"}'

    async def chunked() -> Any:
        # No Content-Length: judged on the bytes read, never read past it.
        for _ in range(100):
            yield b"a" * 1000

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        declared = await http.post("/v1/sessions", content=big, headers=json_type)
        streamed = await http.post("/v1/sessions", content=chunked(), headers=json_type)
        bad_length = await http.post(
            "/v1/sessions",
            content=b"{}",
            headers={**json_type, "Content-Length": "x"},
        )
    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.json()["code"] == "PAYLOAD_TOO_LARGE", answer.text
    assert bad_length.status_code == 400, bad_length.text
    assert bad_length.json()["code"] == "MALFORMED_REQUEST", bad_length.text
