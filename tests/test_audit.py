"""The audit, against the toy payments API straight (it must find duplicates) and behind the
proxy (it must find none), over real loopback sockets; plus its inference rules on plain values.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from proxy.server import serve
from proxy.tools.audit import AuditOptions, run_audit
from proxy.tools.audit.inference import judge_concurrent, judge_replay, judge_timeout
from proxy.tools.audit.model import Attempt, ProbeResult, Verdict
from proxy.tools.audit.probes import variant_body
from proxy.tools.legacy_api import LegacyApi, create_legacy_app
from tests.conftest import free_port, make_config

# Every charge answers after SLOW s, so a client timeout of TIMEOUT s always expires.
SLOW = 0.2
TIMEOUT = 0.1


@dataclass
class Legacy:
    api: LegacyApi
    url: str  # base URL, no path

    @property
    def charges(self) -> str:
        return self.url + "/v1/charges"


@pytest.fixture
async def legacy() -> AsyncIterator[Legacy]:
    """The toy payments API on a free loopback port; every charge is slow."""
    api = LegacyApi(slow_share=1.0, slow_seconds=SLOW, seed=1)
    server = TestServer(create_legacy_app(api), host="127.0.0.1", port=free_port())
    await server.start_server()
    yield Legacy(api, str(server.make_url("")).rstrip("/"))
    await server.close()


def options(url: str, **overrides: object) -> AuditOptions:
    fields: dict[str, object] = {
        "url": url,
        "data": b'{"amount": 1999, "currency": "usd"}',
        "timeout": TIMEOUT,
        "concurrency": 4,
        "yes": True,
    }
    return AuditOptions(**{**fields, **overrides})  # type: ignore[arg-type]


def verdicts(probes: list[ProbeResult]) -> dict[str, Verdict]:
    return {p.name: p.verdict for p in probes}


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- against real servers -------------------------------------------------------------


async def test_audit_finds_duplicates_straight_at_the_api(legacy: Legacy) -> None:
    """Straight at the non-idempotent API the audit sees duplicate executions and fails."""
    out = io.StringIO()
    report = await run_audit(options(legacy.charges), out)

    assert report.exit_code == 1
    assert verdicts(report.probes) == {
        "replay": Verdict.UNSAFE,
        "concurrent": Verdict.UNSAFE,
        "timeout": Verdict.UNSAFE,
        "mismatch": Verdict.WARNING,
        "no-key": Verdict.WARNING,
        "long-key": Verdict.WARNING,
    }
    # 1 (replay) + 3 (4 concurrent) + 1 (timeout): never more than the API's own books say.
    assert report.duplicates == 5
    books = legacy.api.ledger.summary("audit-")
    assert books.duplicate_charges >= report.duplicates
    assert report.requests_sent == len(legacy.api.ledger.charges)
    text = out.getvalue()
    assert "Verdict: UNSAFE" in text and "Exit status 1" in text


async def test_audit_finds_none_through_the_proxy(legacy: Legacy) -> None:
    """Through the proxy the same audit sees no duplicate execution and passes."""
    # reject, so that the concurrent probe meets the 409s it is built to judge
    async with serve(make_config(legacy.url, defaults={"on_concurrent": "reject"})) as proxy:
        out = io.StringIO()
        report = await run_audit(options(proxy.url + "/v1/charges"), out)

    assert report.exit_code == 0, out.getvalue()
    assert verdicts(report.probes) == {
        "replay": Verdict.SAFE,
        "concurrent": Verdict.SAFE,
        "timeout": Verdict.SAFE,
        "mismatch": Verdict.SAFE,
        "no-key": Verdict.WARNING,  # keys are optional on this route: forwarded unprotected
        "long-key": Verdict.SAFE,
    }
    assert report.duplicates == 0
    assert legacy.api.ledger.summary("audit-").duplicate_charges == 0
    burst = next(p for p in report.probes if p.name == "concurrent").attempts
    assert [a.status for a in burst if a.fresh] == [201]  # one executed
    assert 409 in [a.status for a in burst]  # the others: still in progress
    assert "no duplicate execution seen" in out.getvalue()


async def test_audit_command_fails_ci_and_writes_json(legacy: Legacy, tmp_path: Path) -> None:
    """`audit --yes --json FILE` exits 1 on duplicates and writes every probe to FILE."""
    report_path = tmp_path / "audit.json"
    code, out, _err = await run_cli(
        "audit", legacy.charges + "?api_token=url-token", "--yes", "--timeout", str(TIMEOUT),
        "--concurrency", "3",
        "-H", "Authorization: Bearer secret-token", "--data", '{"amount": 500}',
        "--json", str(report_path),
    )  # fmt: skip
    assert code == 1, out
    assert "UNSAFE" in out
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "unsafe" and report["exit_code"] == 1
    assert [p["name"] for p in report["probes"]] == [
        "replay", "concurrent", "timeout", "mismatch", "no-key", "long-key",
    ]  # fmt: skip
    assert report["duplicate_executions"] >= 1
    assert report["limits"]
    assert "secret-token" not in report_path.read_text()  # header values are not recorded
    assert report["target"] == legacy.charges + "?api_token=***"
    assert "url-token" not in out + report_path.read_text()


async def test_audit_command_passes_through_the_proxy(legacy: Legacy) -> None:
    """`audit --yes` through the proxy exits 0, so it can gate a CI pipeline."""
    async with serve(make_config(legacy.url)) as proxy:
        code, out, _err = await run_cli(
            "audit", proxy.url + "/v1/charges", "--yes", "--timeout", str(TIMEOUT)
        )
    assert code == 0, out
    assert "UNSAFE" not in out


async def test_audit_refuses_to_run_without_yes(legacy: Legacy) -> None:
    """Without --yes the audit sends nothing, says why, and exits 2."""
    code, out, err = await run_cli("audit", legacy.charges.replace("://", "://svc:url-pw@"))
    assert code == 2
    assert "--yes" in err and "mutating" in err
    assert "://svc:***@" in err and "url-pw" not in err
    assert out == ""
    assert legacy.api.ledger.charges == []


async def test_audit_of_a_closed_port_exits_3() -> None:
    """When nothing answers, the audit says it could not audit and exits 3, not 0."""
    out = io.StringIO()
    report = await run_audit(options(f"http://127.0.0.1:{free_port()}/v1/charges"), out)
    assert report.exit_code == 3
    assert "COULD NOT AUDIT" in out.getvalue()


async def test_a_url_the_client_refuses_is_reported_without_its_credentials() -> None:
    """The client library's error quotes the URL: the report masks its password."""
    out = io.StringIO()
    report = await run_audit(options("ftp://svc:url-pw@127.0.0.1/v1/charges"), out)
    assert report.exit_code == 3
    assert "ftp://svc:***@127.0.0.1/v1/charges" in out.getvalue()
    assert "url-pw" not in out.getvalue() + json.dumps(report.to_json())


async def test_audit_of_a_wrong_path_exits_3(legacy: Legacy) -> None:
    """A URL that only answers 404 tests nothing: exit 3, so a typo cannot pass a CI gate."""
    out = io.StringIO()
    report = await run_audit(options(legacy.url + "/v1/chargez"), out)
    assert report.exit_code == 3
    assert "no request succeeded" in out.getvalue() and "404" in out.getvalue()
    assert legacy.api.ledger.charges == []


async def test_max_requests_bounds_the_audit(legacy: Legacy) -> None:
    """--max-requests is a hard cap: probes that do not fit are reported as not run."""
    report = await run_audit(options(legacy.charges, max_requests=5))
    assert report.requests_sent <= 5
    assert len(legacy.api.ledger.charges) == report.requests_sent
    skipped = [p.name for p in report.probes if p.happened.startswith("not run")]
    assert "concurrent" in skipped
    assert report.exit_code == 1  # the replay probe still ran and saw the duplicate


# --- the inference rules, on plain values ----------------------------------------------


def answer(identity: str, status: int = 201, replayed: bool = False) -> Attempt:
    """An answer naming resource `identity`."""
    return Attempt("attempt", "k", status, replayed=replayed, resource_id=identity,
                   identity=f"id {identity}", body_sha256=identity)  # fmt: skip


async def test_different_ids_under_one_key_are_a_duplicate_execution() -> None:
    """Two successful answers with different ids and no replay marker: executed twice."""
    verdict, _text, duplicates = judge_replay(answer("ch_1"), answer("ch_2"))
    assert (verdict, duplicates) == (Verdict.UNSAFE, 1)


async def test_replay_marker_and_errors_are_not_executions() -> None:
    """A replayed answer, a 409 and a 422 never count as executions."""
    assert judge_replay(answer("ch_1"), answer("ch_1", replayed=True))[0] is Verdict.SAFE
    burst = [answer("ch_1"), answer("x", status=409), answer("y", status=422)]
    assert judge_concurrent(burst)[::2] == (Verdict.SAFE, 0)


async def test_same_answer_without_marker_is_safe_but_noted() -> None:
    """The same id again without a replay marker is no duplicate, and the audit says so."""
    verdict, text, duplicates = judge_replay(answer("ch_1"), answer("ch_1"))
    assert (verdict, duplicates) == (Verdict.SAFE, 0)
    assert "without Idempotent-Replayed" in text


async def test_timed_out_first_attempt_with_fresh_retry_that_is_then_replayed_warns() -> None:
    """A fresh retry that later attempts replay is a warning: the first may never have run."""
    first = Attempt("first", "k", timed_out=True, error="timed out after 0.1 s")
    verdict, text, duplicates = judge_timeout(
        first, [answer("ch_2")], answer("ch_2", replayed=True), TIMEOUT
    )
    assert (verdict, duplicates) == (Verdict.WARNING, 0)
    assert "never ran" in text


async def test_changed_body_differs_in_meaning() -> None:
    """The mismatch probe's body adds a field to a JSON object rather than whitespace."""
    changed = json.loads(variant_body(b'{"amount": 1}'))
    assert changed["amount"] == 1 and len(changed) == 2
    assert variant_body(b"a=1").startswith(b"a=1&")
