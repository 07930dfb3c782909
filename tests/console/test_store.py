"""The console's store on its own: enrolment tokens are single-use and expire, and only hashes of secrets
are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from dao.console.store import EnrollError, Store


def test_tokens_expire_work_once_and_only_hashes_are_stored(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/dao.db")
    stale = store.issue_token("alice", ttl=-1)
    with pytest.raises(EnrollError, match="expired"):
        store.redeem(stale, "h")
    token = store.issue_token("alice")
    host, credential, user = store.redeem(token, "h")
    assert user == "alice" and store.host_by_credential(credential).id == host  # type: ignore[union-attr]
    with pytest.raises(EnrollError, match="used already"):
        store.redeem(token, "again")
    assert store.host_by_credential(credential + "x") is None and store.host_by_credential("") is None
    raw = (tmp_path / "dao.db").read_bytes()
    assert credential.encode() not in raw and token.encode() not in raw
    store.revoke(host)
    assert store.host_by_credential(credential).revoked  # type: ignore[union-attr]
    store.close()
