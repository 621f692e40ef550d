"""The CDR record (pure): what the writer accepts, what it refuses, and that the hangup parser
never raises whatever FreeSWITCH (or a forger) sends."""

from __future__ import annotations

import random
import string
from decimal import Decimal

import pytest

from engine.billing.cdr import CDR_COLUMNS, BadCdr, cdr_rows
from engine.billing.hangup import parse_hangup
from tests.billing.conftest import cdr


def test_a_good_record_flattens_to_its_row_and_debits() -> None:
    rows = cdr_rows(cdr("u1", [(5, "0.1234565"), (6, "0.05")]))
    row = dict(zip(CDR_COLUMNS, rows.cdr, strict=True))
    assert row["uuid"] == "u1" and row["chain"] == [5, 6]
    assert [d[2:] for d in rows.debits] == [(5, 0, Decimal("0.123457")), (6, 1, Decimal("0.050000"))]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"uuid": ""}, "bad uuid"),
        ({"uuid": 7}, "bad uuid"),
        ({"started_at": None}, "started_at missing"),
        ({"started_at": "2026-12-06T12:00:00"}, "no time zone"),
        ({"billsec": "12.5"}, "not an integer"),
        ({"billsec": True}, "not an integer"),
        ({"customer_debit": "Infinity"}, "not finite"),
        ({"customer_debit": "abc"}, "not a number"),
        ({"chain": "1,2"}, "must be lists"),
        ({"debits": [[1, 0, "1"], [2, 0, "1"]]}, "bad debit"),
        ({"debits": [[1, -1, "1"]]}, "bad debit"),
        ({"debits": "x"}, "must be a list"),
    ],
)
def test_bad_records_are_refused_with_a_reason(change: dict, why: str) -> None:
    record = {**cdr("u1", [(5, "1")]), **change}
    with pytest.raises(BadCdr, match=why):
        cdr_rows(record)


def test_negative_billsec_in_a_record_is_stored_as_zero() -> None:
    row = dict(zip(CDR_COLUMNS, cdr_rows({**cdr("u1", [(5, "1")]), "billsec": -3}).cdr, strict=True))
    assert row["billsec"] == 0


def test_the_hangup_parser_never_raises() -> None:
    rng = random.Random(13)
    names = [
        "variable_billsec", "variable_answer_epoch", "variable_answer_uepoch", "variable_end_epoch",
        "variable_start_uepoch", "variable_duration", "variable_originated_legs", "variable_last_bridge_to",
        "variable_hangup_cause_q850", "variable_sip_term_status", "Unique-ID", "Hangup-Cause",
    ]  # fmt: skip
    alphabet = string.printable + "é\x00"
    for _ in range(2000):
        headers = {
            name: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            if rng.random() < 0.5
            else str(rng.randint(-(10**20), 10**20))
            for name in rng.sample(names, rng.randint(0, len(names)))
        }
        end = parse_hangup(headers)
        assert end.billsec >= 0
