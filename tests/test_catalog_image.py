"""Catalogue images (engine.state.image): every file that does not check out is refused.

Pure file I/O in a temporary directory (no Redis): a refused image means the engine loads
from Redis, never that it decides from a wrong catalogue. The mapped catalogue deciding as
the built one is tested in tests/test_catalog_equivalence.py; a restart mapping the image and
catching up from the journal in tests/test_sync.py.
"""

from __future__ import annotations

import resource
import signal
from decimal import Decimal
from pathlib import Path

import pytest

import engine.model
import engine.rules
from engine.model import Account, AccountKind, CatalogData, OriginationRate, SipDevice
from engine.rules.catalog import Catalog
from engine.state.image import ImageStore, code_fingerprint
from engine.state.snapshot import SnapshotStamp

FINGERPRINT = code_fingerprint([engine.model, engine.rules])
STAMP = SnapshotStamp(7, "abc", 3)


def catalog() -> Catalog:
    accounts = [
        Account(i, f"{1000 + i}", AccountKind.CUSTOMER, None, True, False, False, Decimal(i), Decimal(0), 1)
        for i in range(1, 200)
    ]
    data = CatalogData(
        version=7,
        accounts=accounts,
        sip_devices=[SipDevice(i, i, f"dev{i}") for i in range(1, 200)],
        origination_rates=[OriginationRate(i, str(i), Decimal("0.01"), rate_group_id=1) for i in range(100)],
    )
    built = Catalog.build(data)
    built.track_changes(data)
    return built


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path, "cg:", FINGERPRINT)


def written(store: ImageStore) -> Path:
    path = store.write(STAMP, catalog())
    assert path is not None and path.exists()
    return path


def test_an_image_maps_back_equal(store: ImageStore) -> None:
    written(store)
    loaded = store.load(STAMP)
    assert loaded is not None and loaded.stamp == STAMP
    original, mapped = catalog(), loaded.value
    assert mapped.accounts == original.accounts and mapped.devices == original.devices
    assert mapped.group_rates == original.group_rates
    assert isinstance(mapped.accounts._records, memoryview)
    assert store.load(STAMP._replace(changes=9)) is not None  # older than Redis: the journal fills in


@pytest.mark.parametrize(
    "damage",
    ["truncated", "extended", "flipped byte", "not an image", "empty"],
)
def test_a_damaged_image_is_refused_and_removed(store: ImageStore, damage: str) -> None:
    path = written(store)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "extended":
        data += b"\0" * 8
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    elif damage == "not an image":
        data[:8] = b"GARBAGE!"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.load(STAMP) is None
    assert not path.exists()


def test_another_code_version_or_prefix_is_refused(tmp_path: Path) -> None:
    path = written(ImageStore(tmp_path, "cg:", FINGERPRINT))
    assert ImageStore(tmp_path, "cg:", "other code").load(STAMP) is None
    assert not path.exists()
    moved = written(ImageStore(tmp_path, "cg:", FINGERPRINT))
    other = ImageStore(tmp_path, "other:", FINGERPRINT)
    moved.rename(other.path_of(STAMP.version, STAMP.token))  # a file under another prefix's name
    assert other.load(STAMP) is None


def test_stale_images_are_not_used(store: ImageStore) -> None:
    path = written(store)
    assert store.load(STAMP._replace(version=8)) is None  # another version: no file of that name
    assert store.load(STAMP._replace(token="reset")) is None  # a reset Redis reusing the number
    assert store.load(STAMP._replace(changes=2)) is None  # newer than Redis says: not trusted
    assert path.exists()
    newer = SnapshotStamp(8, "def", 0)
    assert store.write(newer, catalog()) is not None
    assert not path.exists()  # a new version's image replaces the older ones of the prefix
    assert store.load(newer) is not None


def test_a_failed_write_leaves_nothing_and_does_not_raise(store: ImageStore, tmp_path: Path) -> None:
    # A real write failure: the file-size limit makes write() fail as a full disk would (EFBIG).
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, hard))
    try:
        assert store.write(STAMP, catalog()) is None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    assert store.load(STAMP) is None
    blocked = ImageStore(tmp_path / "file" / "sub", "cg:", FINGERPRINT)
    (tmp_path / "file").write_text("a file where the directory should be")
    assert blocked.write(STAMP, catalog()) is None
