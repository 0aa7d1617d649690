"""Token rotation without a restart: the tokens file (a mounted Secret) is re-read when it changes.

Rotation is done as the kubelet does it for a Secret volume: the new content goes to a fresh folder and a
`..data` symlink is swapped atomically, so `tokens.yaml` (a link through `..data`) names a new inode.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.support.config import bearer, platform_config
from tuneplane.api import create_app
from tuneplane.api.auth import TokenIndex
from tuneplane.config import TokenEntry, hash_token
from tuneplane.errors import ConfigError
from tuneplane.store import Principal


class SecretVolume:
    """A folder laid out like a Kubernetes Secret volume with one key, `tokens.yaml`."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.path = root / "tokens.yaml"

    def write_text(self, text: str) -> None:
        self.version += 1
        target = self.root / f"..2026_12_0{self.version}"
        target.mkdir()
        (target / "tokens.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        if not self.path.is_symlink():
            self.path.symlink_to("..data/tokens.yaml")

    def write(self, tokens: dict[str, str]) -> None:
        self.write_text(yaml.safe_dump(entries(tokens)))


def entries(tokens: dict[str, str]) -> list[dict[str, str]]:
    return [{"sha256": hash_token(token), "team": team} for token, team in tokens.items()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(api: TestClient, token: str) -> int:
    return api.get("/v1/jobs", headers=bearer(token)).status_code


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "secret")


@pytest.fixture
def api(tmp_path: Path, volume: SecretVolume):
    volume.write({"tok-old": "alpha", "tok-beta": "beta"})
    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'db'}", auth={"tokens_file": str(volume.path)})
    with TestClient(create_app(config, run_reconciler=False)) as client:
        yield client


def test_rotation_through_the_api_without_a_restart(
    api: TestClient, volume: SecretVolume, caplog: pytest.LogCaptureFixture
) -> None:
    assert (status(api, "tok-old"), status(api, "tok-beta"), status(api, "tok-new")) == (200, 200, 401)

    # rotate: tok-new added, tok-old removed
    volume.write({"tok-new": "alpha", "tok-beta": "beta"})
    assert eventually(lambda: status(api, "tok-new") == 200), "an added token was not picked up"
    assert status(api, "tok-old") == 401, "a removed token still works"
    assert status(api, "tok-beta") == 200
    assert api.get("/v1/jobs", headers=bearer("tok-new")).json()["items"] == []

    # a broken file keeps the tokens in use, and says so without quoting the file
    raw_token = "tok-pasted-by-mistake-5b1e"
    broken = f"- sha256: {hash_token('tok-other')}\n  team: alpha\n- {raw_token}: [unclosed\n"
    with caplog.at_level(logging.WARNING, logger="tuneplane.api"):
        volume.write_text(broken)
        # (the file is looked at when a request comes)
        assert eventually(lambda: status(api, "tok-new") == 200 and "keeping the previous" in caplog.text)
    assert (status(api, "tok-new"), status(api, "tok-beta"), status(api, "tok-other")) == (200, 200, 401)
    assert raw_token not in caplog.text and hash_token("tok-other") not in caplog.text
    assert "tokens.yaml: not valid YAML at line" in caplog.text

    # the next good version is used again
    volume.write({"tok-other": "beta"})
    assert eventually(lambda: status(api, "tok-other") == 200)
    assert status(api, "tok-new") == 401 and status(api, "tok-beta") == 401


def test_static_tokens_stay_and_checks_are_throttled(
    volume: SecretVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    volume.write({"tok-file": "beta"})
    static = [TokenEntry(sha256=hash_token("tok-static"), team="alpha", role="admin")]
    index = TokenIndex(static, volume.path, check_interval_s=1.0, clock=clock)
    assert index.principal("tok-static") == Principal("alpha", "admin")
    assert index.principal("tok-file") == Principal("beta", "member")

    stats: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    volume.write({"tok-next": "beta"})
    stats.clear()
    for _ in range(100):  # within the interval: no look at the file at all
        assert index.principal("tok-next") is None
    assert stats == []
    clock.now += 1.0
    assert index.principal("tok-next") == Principal("beta", "member")
    assert len(stats) == 1  # one stat per check
    assert index.principal("tok-file") is None
    assert index.principal("tok-static") == Principal("alpha", "admin")  # config tokens are not rotated


def test_in_place_rewrite_and_removal(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(entries({"tok-a": "alpha"})))
    index = TokenIndex([], path, clock=clock)
    assert index.principal("tok-a") is not None
    path.write_text(yaml.safe_dump(entries({"tok-b": "alpha", "tok-c": "beta"})))  # same inode, other size
    clock.now += 1.5
    assert index.principal("tok-a") is None and index.principal("tok-b") is not None
    path.unlink()  # the key was removed from the Secret: its tokens are revoked
    clock.now += 1.5
    assert index.principal("tok-b") is None and index.entries == 0
    path.write_text(yaml.safe_dump(entries({"tok-d": "beta"})))
    clock.now += 1.5
    assert index.principal("tok-d") == Principal("beta", "member")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("- sha256: [\n", "not valid YAML at line"),
        ("sha256: abc\nteam: alpha\n", "expected a list of token entries, got dict"),
        (f"- sha256: {hash_token('x')[:-1]}\n  team: alpha\n", "0.sha256: String should match pattern"),
        (f"- sha256: {hash_token('x')}\n  team: alpha\n  role: root\n", "0.role: Input should be"),
        (f"- sha256: {hash_token('x')}\n  team: alpha\n  tok-raw-9d: 1\n", "0.<unknown field>: Extra inputs"),
        ("- tok-raw-9d\n", "0: Input should be a valid dictionary"),
    ],
)
def test_malformed_file_problems_name_the_field_not_the_value(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:  # at start: refuse to serve rather than serve nobody
        TokenIndex([], path)
    message = str(info.value)
    assert where in message, message
    assert "tok-raw-9d" not in message and hash_token("x")[:20] not in message


def test_broken_update_is_reported_once(volume: SecretVolume, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    volume.write({"tok-a": "alpha"})
    index = TokenIndex([], volume.path, clock=clock)
    volume.write_text("- [\n")
    with caplog.at_level(logging.WARNING, logger="tuneplane.api"):
        for _ in range(5):
            clock.now += 1.5
            assert index.principal("tok-a") == Principal("alpha", "member")
    assert len([r for r in caplog.records if "keeping the previous tokens" in r.getMessage()]) == 1
