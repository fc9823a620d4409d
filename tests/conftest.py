from __future__ import annotations

from pathlib import Path

import pytest

from fedglm.certs import CertPaths, make_certificates
from tests.bases import make_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certificates(tmp_path_factory.mktemp("certs"), hosts=["127.0.0.1"])


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A second, unrelated CA: a hospital holding this one must be refused."""
    return make_certificates(tmp_path_factory.mktemp("other-certs"), hosts=["127.0.0.1"])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GLM-4 base folder (random weights, a tokenizer trained on public notes)."""
    return make_base(tmp_path_factory.mktemp("base") / "model")
