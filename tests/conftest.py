from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedglm.certs import CertPaths, make_certificates
from tests.bases import make_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the models tests run in this process: on a loaded 2-core
    machine two threads ran a tiny model 10-60x slower (processes a test starts are unaffected)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
