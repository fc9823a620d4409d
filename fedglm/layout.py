"""Where things are in the folders fedglm writes: one home for every shared file name.

A run folder (`fedglm server`'s `out_dir`, `fedglm simulate`'s `--out`):

    run-spec.json        what was run (`RunSpec`), read by the ServerApp, release and model card
    metrics.jsonl        one line per finished round (`metrics.py`)
    checkpoint.pt        the global model after the last finished round (`server/checkpoint.py`)
    DONE                 the last finished round, once the run has ended
    serverapp.log        the ServerApp's log
    receipt.key / .pub   the coordinator's key that countersigns ledgers (made on first start)
    receipts/<site>.jsonl  every receipt the coordinator signed
    ledgers/<site>.jsonl   every ledger line it countersigned
    base.json            the base model's manifest (`fedglm pretrain`), copied from the base folder
    SIMULATION           marks a folder `fedglm simulate` made (`simulate.py`)
    release/             teacher/ and model/ (Hugging Face folders: the final global model and
                         the served one), distill.json, export.json, model*.onnx, model.plan,
                         MODEL_CARD.md, model_card.json (`release.py`, `modelcard.py`)

`fedglm pretrain`'s `out_dir`: `model/` (the base: a Hugging Face folder with the manifest
`fedglm-base.json` inside) and `pretrain-state.pt`.
A site's state folder has its own layout (`privacy/site.py`, `clients/state.py`).
"""

from __future__ import annotations

SPEC_NAME = "run-spec.json"
SPEC_KEY = "fedglm-spec"  # the run config value that hands the spec's path to the ServerApp
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
BEST_CHECKPOINT = "best.pt"  # the best round's checkpoint, with federation.selection
DONE_NAME = "DONE"
SERVERAPP_LOG = "serverapp.log"
RECEIPT_KEY_NAME = "receipt"  # receipt.key, receipt.pub
RECEIPTS_DIR = "receipts"
LEDGER_COPIES = "ledgers"
SIMULATION_MARK = "SIMULATION"

BASE_MODEL_DIR = "model"  # in pretrain's out_dir
BASE_MANIFEST = "fedglm-base.json"  # inside a base folder made by fedglm pretrain
MANIFEST_FILE = "base.json"  # the base's manifest, copied into the run folder
PRETRAIN_STATE_FILE = "pretrain-state.pt"

RELEASE_DIR = "release"
DISTILL_REPORT = "distill.json"
EXPORT_REPORT = "export.json"
TEACHER_DIR = "teacher"  # the final (pruned) global model, a Hugging Face folder
SERVED_DIR = "model"  # the served model (the student, else the teacher), a Hugging Face folder
ONNX_FILES = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
    "cache": "model.kv.onnx",  # one decoding step with a KV cache (`fedglm generate`)
}
ENGINE_FILE = "model.plan"
CARD_MD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
