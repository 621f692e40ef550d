"""`callgate cdr replay`: FreeSWITCH's err-log-dir posted back to a real /cdr endpoint over a real Redis.

The err-log-dir files are written by the emulated mod_json_cdr (loadtest.fsemu.json_cdr) after
its posts failed, in each of its encodings; the command runs through `callgate`'s own entry
point. The endpoint is served by gevent in this process, so the command (blocking urllib) runs
in gevent's thread pool.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import gevent
import redis

from engine.billing.funds import Funds
from engine.billing.live import PricedAccept
from engine.cli import main
from engine.fsxml.jsoncdr import FORM, FORM_BASE64, JSON
from engine.fsxml.replay import request_body
from loadtest.fsemu.json_cdr import CdrSettings, b_leg_document, post_cdr
from tests.billing import test_cdr_post
from tests.billing.test_cdr_post import CRED, SECRET, Service, a_leg, engine_settles, stream
from tests.rules.builders import World
from tests.support import free_port

# test_cdr_post's fixtures: the world, its priced decision, Funds on the test's Redis, the endpoint
world, decided, funds, service = (
    test_cdr_post.world,
    test_cdr_post.decided,
    test_cdr_post.funds,
    test_cdr_post.service,
)


def saved(document: dict, err_log_dir: Path, encode: str = "false") -> Path:
    """What FreeSWITCH leaves when every post failed: <err-log-dir>/<uuid>.cdr.json."""
    dead = CdrSettings(
        urls=[f"http://127.0.0.1:{free_port()}/cdr"], cred=CRED, encode=encode, err_log_dir=str(err_log_dir)
    )
    result = post_cdr(document, dead)
    assert result.statuses == [0] and result.backup is not None
    return result.backup


def replay(tmp_path: Path, directory: Path, url: str, password: str = SECRET) -> tuple[int, str]:
    config = tmp_path / "callgate.toml"
    config.write_text(f'[fsxml]\nusername = "freeswitch"\npassword = "{password}"\n')
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["--config", str(config), "cdr", "replay", str(directory), "--url", url])

    code = gevent.get_hub().threadpool.apply(run)
    return code, out.getvalue()


def lines(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines()[:-1]:
        name, _, rest = line.partition(": ")
        found[name.removesuffix(".cdr.json")] = rest.split(": ")[0]
    return found


def test_a_replay_bills_each_saved_cdr_once_keeps_what_it_could_not_and_a_rerun_is_safe(
    service: Service,
    decided: PricedAccept,
    world: World,
    funds: Funds,
    client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    err_log = tmp_path / "err-log"
    err_log.mkdir()
    # encode=true is left out: with encode-values (FreeSWITCH's default) it breaks the JSON of
    # most calls in FreeSWITCH itself (docs/freeswitch.md); request_body's test covers its form.
    for encode in ("false", "base64"):
        saved(a_leg(decided, f"lost-{encode}")[0], err_log, encode)
    engine_first, event = a_leg(decided, "engine-first")
    saved(engine_first, err_log)
    assert engine_settles(decided, world, funds, event)[0]  # the engine billed it meanwhile
    saved(b_leg_document(engine_first, "b-leg", "gw-b", billsec="3"), err_log)
    (err_log / "garbage.cdr.json").write_text("{not a cdr\n")
    (err_log / "notes.txt").write_text("not FreeSWITCH's\n")  # not a saved CDR: left alone

    code, output = replay(tmp_path, err_log, service.url)
    assert code == 1, output
    assert lines(output) == {
        "lost-false": "billed",
        "lost-base64": "billed",
        "engine-first": "already billed",
        "b-leg": "ignored",
        "garbage": "refused (kept)",
    }
    assert output.splitlines()[-1].endswith("1 already billed, 2 billed, 1 ignored, 1 refused")
    assert sorted(p.name for p in err_log.iterdir()) == ["garbage.cdr.json", "notes.txt", "replayed"]
    assert len(list((err_log / "replayed").iterdir())) == 4
    records = sorted(r["uuid"] for r in stream(client, key_prefix))
    assert records == ["engine-first", "lost-base64", "lost-false"]
    assert service.receiver.counts["billed"] == 2

    # A rerun posts only what is left: nothing is billed twice, the refused file stays.
    code, output = replay(tmp_path, err_log, service.url)
    assert code == 1 and lines(output) == {"garbage": "refused (kept)"}
    assert service.receiver.counts["billed"] == 2 and len(stream(client, key_prefix)) == 3
    assert (err_log / "garbage.cdr.json").exists()


def test_with_the_endpoint_down_or_refusing_nothing_moves_and_the_exit_code_says_so(
    service: Service, decided: PricedAccept, client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    err_log = tmp_path / "err-log"
    err_log.mkdir()
    saved(a_leg(decided, "waiting")[0], err_log)
    down = f"http://127.0.0.1:{free_port()}/cdr"
    code, output = replay(tmp_path, err_log, down)
    assert code == 1 and lines(output) == {"waiting": "unavailable (kept)"}
    code, output = replay(tmp_path, err_log, service.url, password="wrong")  # 401
    assert code == 1 and lines(output) == {"waiting": "refused (kept)"}
    assert SECRET not in output and "wrong" not in output
    assert [p.name for p in err_log.iterdir()] == ["waiting.cdr.json"] and stream(client, key_prefix) == []
    code, output = replay(tmp_path, err_log, service.url)
    assert code == 0 and lines(output) == {"waiting": "billed"}
    code, output = replay(tmp_path, err_log, service.url)
    assert code == 0 and output.strip().endswith("nothing to replay")
    assert [r["uuid"] for r in stream(client, key_prefix)] == ["waiting"]


def test_redis_away_is_unavailable_and_kept(
    decided: PricedAccept, world: World, key_prefix: str, tmp_path: Path
) -> None:
    err_log = tmp_path / "err-log"
    err_log.mkdir()
    saved(a_leg(decided, "redis-away")[0], err_log)
    away = Service(
        Funds(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5), key_prefix), world.catalog()
    )
    try:
        code, output = replay(tmp_path, err_log, away.url)
    finally:
        away.stop()
    assert code == 1 and lines(output) == {"redis-away": "unavailable (kept)"}
    assert (err_log / "redis-away.cdr.json").exists()


def test_the_body_is_what_mod_json_cdr_would_have_posted() -> None:
    assert request_body('{"variables":{}}\n') == (b'{"variables":{}}', JSON)
    assert request_body("%7B%22variables%22%3A%7B%7D%7D\n") == (b"cdr=%7B%22variables%22%3A%7B%7D%7D", FORM)
    assert request_body("eyJ2YXJpYWJsZXMiOnt9fQ==\n") == (b"cdr=eyJ2YXJpYWJsZXMiOnt9fQ==", FORM_BASE64)
