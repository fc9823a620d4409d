"""`fedglm simulate` checks every input before it touches the run folder, and deletes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedglm.cli.main import app
from fedglm.config import DataConfig, PrivacyConfig, SimulateConfig, SiteSpec, load_config
from fedglm.errors import InputError
from fedglm.layout import SIMULATION_MARK
from fedglm.simulate import PREVIOUS, check_out_dir, keep_earlier_run, with_base


def earlier_simulation(out: Path) -> None:
    """What a finished simulation leaves: its mark, results, a site's ledger and key, a base."""
    for name, text in {
        SIMULATION_MARK: "",
        "metrics.jsonl": "{}\n",
        "DONE": "",
        "sites/site-1/state/privacy/ledger.jsonl": "a ledger line\n",
        "sites/site-1/state/ledger.key": "a key",
        "base/model/config.json": "a cached base model folder",
    }.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_bad_data_leaves_an_earlier_simulation_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    earlier_simulation(out)
    before = snapshot(out)
    config = tmp_path / "s.yaml"
    site = "    data: {path: missing.csv, field: text}\n    privacy: {sample_rate: 0.1}\n"
    config.write_text("sites:\n" + "".join(f"  - name: h{i}\n{site}" for i in (1, 2, 3)))
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2 and "missing.csv" in result.stderr, result.output
    assert snapshot(out) == before


def test_a_folder_no_simulation_made_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="holds no earlier simulation"):
        check_out_dir(tmp_path)
    with pytest.raises(InputError, match="existing file"):
        check_out_dir(tmp_path / "thesis.tex")
    check_out_dir(tmp_path / "new")  # a new folder, or an empty one, is fine
    legacy = tmp_path / "legacy"  # a simulation made before the mark existed
    (legacy / "sites").mkdir(parents=True)
    (legacy / "run-spec.json").write_text("{}")
    check_out_dir(legacy)


def test_an_earlier_simulation_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    earlier_simulation(tmp_path)
    keep_earlier_run(tmp_path, on_status=lambda _: None)
    [kept] = list((tmp_path / PREVIOUS).iterdir())
    assert (kept / "sites/site-1/state/privacy/ledger.jsonl").read_text() == "a ledger line\n"
    assert (kept / "sites/site-1/state/ledger.key").exists() and (kept / "metrics.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", PREVIOUS, SIMULATION_MARK])
    assert (tmp_path / "base" / "model" / "config.json").exists()  # the pretrained base is reused


def test_a_simulation_needs_a_base_folder_or_a_pretrain_section(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("pretrain: null\n")
    with pytest.raises(InputError, match=r"set federation\.base \(a model folder\) or a pretrain section"):
        load_config(config, SimulateConfig)
    config.write_text("pretrain: null\nfederation:\n  base: model\n")
    assert load_config(config, SimulateConfig).federation.base == tmp_path / "model"
    assert SimulateConfig().pretrain is not None  # the default pretrains a base on public text


def test_sites_fine_tune_the_federation_base_unless_they_name_their_own_copy(tmp_path: Path) -> None:
    data = DataConfig(path=tmp_path / "notes.csv", field="text")
    privacy = PrivacyConfig(sample_rate=0.1)
    own = SiteSpec(name="own", data=data, privacy=privacy, base=tmp_path / "copy")
    plain = SiteSpec(name="plain", data=data, privacy=privacy)
    assert plain.base is None
    sites = with_base([own, plain], tmp_path / "base" / "model")
    assert [site.base for site in sites] == [tmp_path / "copy", tmp_path / "base" / "model"]
    assert [site.name for site in sites] == ["own", "plain"]
