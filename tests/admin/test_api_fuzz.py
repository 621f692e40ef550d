"""The API fuzzed against its own OpenAPI document (schemathesis; issue 15.8).

Every operation gets generated requests, valid and invalid ones, sent to the application on the
real PostgreSQL test database. Nothing may answer 5xx, every response must be one the document
describes (status, content type, headers, body schema), and requests the document calls invalid
must be refused. Bounded in time: a few derandomized examples per operation and mode, no
per-example deadline (the machine is shared); about a minute.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.unsupported_method,
    checks.missing_required_header,
    checks.ignored_auth,
]
# CALLGATE_FUZZ_EXAMPLES=200 fuzzes harder (minutes), for a developer's run; CI keeps the default.
_SCALE = int(os.environ.get("CALLGATE_FUZZ_EXAMPLES", "0"))
EXAMPLES = {GenerationMode.POSITIVE: _SCALE or 20, GenerationMode.NEGATIVE: _SCALE or 15}


@pytest.fixture(scope="module")
def fuzz_schema(app, admin_token):
    return schemathesis.openapi.from_wsgi(
        "/api/v1/openapi.json", app, headers={"Authorization": f"Bearer {admin_token}"}
    )


def _fuzz(operation, mode, headers, path_parameters=None):
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=not _SCALE, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


@pytest.fixture(scope="module")
def fuzzed_account(api):
    """A real account, so that generated requests also reach existing rows, not only 404."""
    body = {"first_name": "Fuzz", "rate_group": "retail", "email": "fuzz@example.com", "number": "5900000001"}
    assert api.post("/customers", json=body).status_code == 201
    return "5900000001"


@pytest.mark.slow  # about a minute in all
@pytest.mark.parametrize(
    ("mode", "on_account"),
    [(GenerationMode.POSITIVE, False), (GenerationMode.NEGATIVE, False), (GenerationMode.POSITIVE, True)],
    ids=["positive", "negative", "positive-on-an-account"],
)
def test_no_operation_answers_5xx_or_outside_its_document(
    fuzz_schema, admin_token, fuzzed_account, mode, on_account
):
    headers = {"Authorization": f"Bearer {admin_token}"}
    failures = []
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) > 40
    for operation in operations:
        fixed = None
        if on_account:
            if "{number}" not in operation.path:
                continue
            fixed = {"number": fuzzed_account}
        try:
            _fuzz(operation, mode, headers, fixed)
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
