"""Differential privacy at a site: DP-SGD with Opacus, accountants, the signed ledger, the audit.

- `accounting.py`: epsilon of a history of DP-SGD rounds (Opacus PRV or RDP), sigma calibration.
- `dpsgd.py`: one round of DP-SGD over Poisson-sampled records.
- `keys.py`: the Ed25519 keys that sign ledger entries and receipts.
- `ledger.py`: the per-site JSONL ledger (canonical JSON, SHA-256 chain, signatures).
- `receipts.py`: the coordinator's countersignature of each entry it receives.
- `site.py`: a site's privacy for one round: plan it (or decline it), then record it.
- `audit.py`: what `fedglm audit` checks and recomputes (Google's dp-accounting).
"""
