import hashlib
import os
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedglm.app_bundle import FAB_DIR, AppRefused, check_fab, fab_bytes, fab_sha256


def test_own_bundle_is_reproducible_and_accepted(tmp_path: Path) -> None:
    """Built from scratch twice (copies with different mtimes, and FAB_DIR itself), the bundle is
    the same bytes, the hash every site pins, and `check_fab` accepts it."""
    builds = []
    for index, mtime in enumerate((1_000_000_000, 1_700_000_000)):
        copy = tmp_path / f"copy-{index}"
        shutil.copytree(FAB_DIR, copy)
        for path in [copy, *copy.rglob("*")]:
            os.utime(path, (mtime, mtime))
        builds.append(build_fab_from_disk(copy))
    builds.append(build_fab_from_disk(FAB_DIR))
    assert builds[0] == builds[1] == builds[2]
    digest = hashlib.sha256(builds[0]).hexdigest()
    assert digest == fab_sha256()
    check_fab(builds[0], digest, {fab_sha256()})


def test_a_changed_bundle_source_changes_the_hash(tmp_path: Path) -> None:
    """The pin means something: another version in the app's pyproject.toml is another bundle."""
    copy = tmp_path / "changed"
    shutil.copytree(FAB_DIR, copy)
    toml = copy / "pyproject.toml"
    text = toml.read_text(encoding="utf-8")
    assert 'version = "0.1.0"' in text
    toml.write_text(text.replace('version = "0.1.0"', 'version = "0.1.1"'), encoding="utf-8")
    changed = build_fab_from_disk(copy)
    assert hashlib.sha256(changed).hexdigest() != fab_sha256()
    with pytest.raises(AppRefused, match="refused app bundle sha256="):
        check_fab(changed, hashlib.sha256(changed).hexdigest(), {fab_sha256()})


def test_other_bundle_or_lying_hash_is_refused() -> None:
    other = fab_bytes() + b"x"
    with pytest.raises(AppRefused, match="refused app bundle sha256="):
        check_fab(other, hashlib.sha256(other).hexdigest(), {fab_sha256()})
    with pytest.raises(AppRefused, match="claimed hash"):
        check_fab(fab_bytes(), "0" * 64, {fab_sha256()})
