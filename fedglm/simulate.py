"""`fedglm simulate`: the whole federation on one machine, over Flower's real deployment engine.

One SuperLink and one SuperNode per site, all on 127.0.0.1 with TLS (a throw-away CA made in
the run folder), free ports, each process with its own FLWR_HOME under `<out>/flower/`. Sites
come from the config, or from the built-in generated corpus. Whatever happens, every process
started here is stopped before this returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedglm.atomic import atomic_write_text
from fedglm.certs import make_certificates
from fedglm.clients.site import SITE_NAME, describe_site_data
from fedglm.clients.supernode import start_supernode
from fedglm.config import DataConfig, FederationConfig, PretrainConfig, ShareConfig, SimulateConfig, SiteSpec
from fedglm.corpus import write_generated_corpus
from fedglm.errors import InputError, check_out_folder
from fedglm.layout import BASE_MODEL_DIR, SIMULATION_MARK, SPEC_NAME
from fedglm.models.base import open_federation_base
from fedglm.nodes import NODE_PUB, ensure_node_keys, read_node_public_key
from fedglm.pretrain import OtherConfigState, pretrain
from fedglm.privacy.keys import load_private_key, make_keys
from fedglm.privacy.ledger import split_releases
from fedglm.privacy.site import LEDGER_FILE, RECEIPTS_FILE, open_ledger, privacy_dir
from fedglm.processes import ManagedProcess, free_port
from fedglm.server.coordinator import RowCallback, admit_sites, execute_run, write_spec
from fedglm.server.public_eval import PublicEval
from fedglm.server.superlink import TLSFiles, start_superlink

PREVIOUS = "previous"
REUSED = ("base", "data", SIMULATION_MARK, PREVIOUS)  # kept in place between simulations


def check_out_dir(out_dir: Path) -> None:
    """Refuse a run folder that is a file, or a non-empty folder no simulation made."""
    check_out_folder(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _earlier_simulation(out_dir):
        raise InputError(
            f"--out {out_dir} is not empty and holds no earlier simulation; name a new or empty "
            "folder (fedglm simulate keeps each earlier simulation's results under <out>/previous/)"
        )


def _earlier_simulation(out_dir: Path) -> bool:
    """Marked by a simulation, or (made before the mark existed) a run folder with sites."""
    if (out_dir / SIMULATION_MARK).exists():
        return True
    return (out_dir / SPEC_NAME).is_file() and (out_dir / "sites").is_dir()


def keep_earlier_run(out_dir: Path, on_status: Callable[[str], None]) -> None:
    """Move what an earlier simulation left in `out_dir` aside, then mark the folder as ours."""
    earlier = sorted(p for p in out_dir.iterdir() if p.name not in REUSED) if out_dir.is_dir() else []
    if earlier:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        kept = out_dir / PREVIOUS / stamp
        kept.mkdir(parents=True)
        for path in earlier:
            path.rename(kept / path.name)
        on_status(f"the earlier simulation's results, ledgers and keys are kept in {kept}")
    atomic_write_text(out_dir / SIMULATION_MARK, "a run folder of fedglm simulate\n")


def simulated_sites(config: SimulateConfig, out_dir: Path) -> list[SiteSpec]:
    """The sites of a simulation; each keeps its state under `<out>/sites/<name>/state` unless
    set (the base folder is given them once it exists: `with_base`)."""
    if config.sites is not None:
        sites = list(config.sites)
    else:
        gen = config.generated
        paths = write_generated_corpus(
            out_dir / "data", sites=gen.sites, records_per_site=gen.records_per_site, seed=gen.seed
        )
        # Generated text, not patient data: its losses and record counts are declared public.
        sites = [
            SiteSpec(
                name=f"site-{i}",
                data=DataConfig(path=p, format="jsonl", field="text"),
                share=ShareConfig(loss=True, record_count=True),
                privacy=config.privacy,
            )
            for i, p in enumerate(paths, start=1)
        ]
    return [
        site
        if site.state_dir is not None
        else site.model_copy(update={"state_dir": out_dir / "sites" / site.name / "state"})
        for site in sites
    ]


def with_base(sites: list[SiteSpec], base: Path | None) -> list[SiteSpec]:
    """Each site fine-tunes the federation's base folder, unless it names its own copy."""
    return [site if site.base is not None else site.model_copy(update={"base": base}) for site in sites]


def ensure_signing_keys(sites: list[SiteSpec]) -> None:
    """A simulation makes each DP site's ledger key if it has none (`fedglm keys` does it for
    a real site)."""
    for site in sites:
        key = site.signing_key()
        if site.privacy.enabled and not key.exists():
            make_keys(key.parent, key.stem)


def privacy_rows(sites: list[SiteSpec]) -> list[dict[str, Any]]:
    """Each DP site's ledger, as the site's own summary: entries, epsilon spent, receipts."""
    rows = []
    for site in sites:
        if not site.privacy.enabled or site.state_dir is None:
            continue
        folder = privacy_dir(site.state_dir)
        _, lines = open_ledger(site.state_dir, load_private_key(site.signing_key()))
        receipts = folder / RECEIPTS_FILE
        updates, metric_lines = split_releases(lines)
        last = updates[-1].entry if updates else {}
        rows.append(
            {
                "site": site.name,
                "rounds": len(updates),
                "metric_releases": len(metric_lines),
                "epsilon": lines[-1].entry["epsilon"] if lines else 0.0,
                "budget": site.privacy.epsilon,
                "delta": site.privacy.delta,
                "sigma": last.get("sigma"),
                "q": last.get("q"),
                "receipts": len(receipts.read_text().splitlines()) if receipts.exists() else 0,
                "ledger": str(folder / LEDGER_FILE),
            }
        )
    return rows


@dataclass
class LocalStack:
    """A running SuperLink and its SuperNodes on 127.0.0.1; `nodes`: node id -> site name."""

    address: str
    ca_cert: Path
    superlink: ManagedProcess
    supernodes: list[ManagedProcess]
    nodes: dict[int, str]


@contextlib.contextmanager
def local_stack(
    sites: list[SiteSpec],
    out_dir: Path,
    *,
    on_status: Callable[[str], None],
    allowed_apps: list[str] | None = None,
    extra_pythonpath: list[Path] | None = None,
) -> Iterator[LocalStack]:
    """Start a TLS SuperLink admitting only the sites' node keys (made in each site's state
    folder, as `fedglm client` does) and one SuperNode per site; stop them all on the way out."""
    certs = make_certificates(out_dir / "certs", hosts=["127.0.0.1"], overwrite=True)
    tls = TLSFiles(ca_cert=certs.ca_cert, server_cert=certs.server_cert, server_key=certs.server_key)
    # The sites share this machine's cores: oversubscribed torch threads only slow them down.
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    homes = {site.name: out_dir / "flower" / site.name for site in sites}
    node_keys = {site.name: ensure_node_keys(site.state_dir or homes[site.name]) for site in sites}
    processes: list[ManagedProcess] = []
    try:
        port = free_port()
        processes.append(
            start_superlink(
                host="127.0.0.1",
                port=port,
                tls=tls,
                home=out_dir / "flower" / "superlink",
                extra_pythonpath=extra_pythonpath,
                allowed_apps=allowed_apps,
                node_auth=True,
            )
        )
        listed = {
            name: read_node_public_key(key.with_name(NODE_PUB), "node key") for name, key in node_keys.items()
        }
        nodes = admit_sites(f"127.0.0.1:{port}", tls.ca_cert, listed)
        on_status(f"SuperLink up on 127.0.0.1:{port} (TLS; {len(nodes)} listed node keys)")
        for site in sites:
            spec_path = out_dir / "sites" / site.name / SITE_NAME
            atomic_write_text(spec_path, site.model_dump_json(indent=2) + "\n")
            processes.append(
                start_supernode(
                    coordinator=f"127.0.0.1:{port}",
                    ca_cert=tls.ca_cert,
                    runtime_port=free_port(),
                    site_spec=spec_path,
                    home=homes[site.name],
                    name=f"SuperNode {site.name}",
                    allowed_apps=allowed_apps,
                    torch_threads=threads,
                    extra_pythonpath=extra_pythonpath,
                    node_key=node_keys[site.name],
                )
            )
        on_status(f"{len(sites)} SuperNodes up")
        yield LocalStack(f"127.0.0.1:{port}", tls.ca_cert, processes[0], processes[1:], nodes)
    finally:
        for process in reversed(processes):
            process.stop()


def simulation_federation(
    config: SimulateConfig, out_dir: Path, on_status: Callable[[str], None]
) -> FederationConfig:
    """The federation to run: from `federation.base`, or else from a base pretrained into
    `<out>/base/` on generated public text, kept there and reused."""
    fed = config.federation
    if fed.base is None and config.pretrain is not None:
        folder = out_dir / "base"
        cfg = PretrainConfig.model_validate({**config.pretrain.model_dump(), "out_dir": folder})
        on_status(f"pretraining the base model on public text ({cfg.steps} steps; kept in {folder})")
        try:
            manifest = pretrain(cfg)
        except OtherConfigState:
            shutil.rmtree(folder)
            manifest = pretrain(cfg)
        on_status(
            f"base model {manifest['folder_hash'][:16]}...: held-out loss "
            f"{manifest['final']['val_loss']:.4f} on public text"
        )
        fed = fed.model_copy(update={"base": folder / BASE_MODEL_DIR})
    base, _ = open_federation_base(fed)  # adapters the base's family lacks fail before any site starts
    if fed.public_eval is not None:  # so does public evaluation text that cannot be read
        PublicEval.open(fed.public_eval, base, fed.train.seq_len)
    return fed


def run_simulation(
    config: SimulateConfig,
    out_dir: Path,
    *,
    on_row: RowCallback,
    on_status: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the simulation; returns the metrics rows and each DP site's `privacy_rows`.

    Every input is checked before anything is written (`check_out_dir`, the sites' data).
    Every simulation then starts fresh, and deletes nothing: what an earlier simulation left in
    `<out>` (metrics, checkpoint, sites with their ledgers and keys, receipts, release) is
    moved into `<out>/previous/<time>/`; only the pretrained base and the generated corpus
    are reused. A site whose own `state_dir` lies outside `<out>` keeps it, ledger included.
    """
    out_dir = out_dir.absolute()
    check_out_dir(out_dir)
    for site in config.sites or []:
        on_status(describe_site_data(site))  # bad data fails here, before anything is touched
    if config.federation.base is not None:
        open_federation_base(config.federation)  # so does a bad base or adapter setting
    keep_earlier_run(out_dir, on_status)
    sites = simulated_sites(config, out_dir)
    ensure_signing_keys(sites)
    if config.sites is None:
        for site in sites:
            on_status(describe_site_data(site))
    federation = simulation_federation(config, out_dir, on_status)
    sites = with_base(sites, federation.base)
    with local_stack(sites, out_dir, on_status=on_status) as stack:
        on_status(f"running {federation.rounds} rounds")
        spec_path = write_spec(out_dir, federation, resume=False, nodes=stack.nodes)
        rows = execute_run(
            superlink=stack.superlink,
            address=stack.address,
            ca_cert=stack.ca_cert,
            spec_path=spec_path,
            out_dir=out_dir,
            on_row=on_row,
            processes=stack.supernodes,
        )
    return rows, privacy_rows(sites)
