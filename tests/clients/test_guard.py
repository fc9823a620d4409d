import hashlib

import pytest

from fedglm.app_bundle import AppRefused, check_fab, fab_bytes, fab_sha256


def test_own_bundle_is_reproducible_and_accepted() -> None:
    assert fab_sha256() == hashlib.sha256(fab_bytes()).hexdigest()
    check_fab(fab_bytes(), fab_sha256(), {fab_sha256()})


def test_other_bundle_or_lying_hash_is_refused() -> None:
    other = fab_bytes() + b"x"
    with pytest.raises(AppRefused, match="refused app bundle sha256="):
        check_fab(other, hashlib.sha256(other).hexdigest(), {fab_sha256()})
    with pytest.raises(AppRefused, match="claimed hash"):
        check_fab(fab_bytes(), "0" * 64, {fab_sha256()})
