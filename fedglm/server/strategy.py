"""fedglm's aggregation strategy: which sites to ask, and what their replies add up to.

`FedglmAvg` follows fedglm's own round protocol (`rounds.RoundStrategy`), not Flower's
`Strategy` signatures: messages are built from the round's typed settings
(`protocol.RoundConfig`) and carry compressed payloads (`compression/FORMAT.md`), never the
model as dense tensors; replies come back as typed outcomes (`TrainOutcome`, `EvalOutcome`).
Its parts each live elsewhere:
- the global model, what every node holds of it and the pruning mask: `global_model.py`;
- whether an update may count by its ledger entry (DP required): `ledger_check.py`;
- each site's norm bound and the mean or robust rule: `combine.py`, `robust.py`.
What is left here:
- Each reply's payload is parsed and checked in full (format, checksum, names, shapes, index
  ranges, finite values, the round and the model it was built on), then its ledger entry,
  before any of it is added; a bad reply leaves that site out of the round, counted by reason.
- A site that declines a round (its budget would be exceeded) is not asked to train again.
- Weights are uniform by default, because a site's record count is private; a coordinator may
  ask for record-count weights, used only in a round where every replying site declared its
  count public. The robust rules count every site once.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common import MessageType, log
from flwr.serverapp import Grid

from fedglm.compression import Kind, PayloadError, check_header, decode
from fedglm.config import CompressionConfig, LinkConfig
from fedglm.flower import sample_nodes
from fedglm.payload import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LEDGER_KEY,
    METRICS_KEY,
    RECEIPT_KEY,
    payload_record,
    read_payload,
    site_number,
    site_text,
)
from fedglm.privacy.ledger import LedgerLine
from fedglm.protocol import RoundConfig, receipts_record
from fedglm.server.combine import norm_bound, robust_combine, update_norm, weighted_mean
from fedglm.server.global_model import GlobalModel
from fedglm.server.ledger_check import LedgerCheck
from fedglm.server.robust import ROBUST_RULES, check_trim_fraction
from fedglm.server.site_metrics import SiteMetrics, SiteMetricsPool

Weighting = Literal["uniform", "records"]
Aggregation = Literal["mean", "trimmed-mean", "median"]
AGGREGATIONS: tuple[Aggregation, ...] = ("mean", *ROBUST_RULES)


@dataclass(frozen=True)
class TrainOutcome:
    """What a round's training replies came to."""

    clients: int  # updates used
    declined: int  # sites that declined the round (budget spent)
    rejections: dict[str, int]  # updates left out, by reason
    clipped: int  # updates scaled down to the norm bound
    norm_bound: float | None  # the round's bound on one site's update norm (None: unbounded)
    train_loss: float | None  # mean of the losses sites declared public
    epsilon: dict[str, float]  # each site's largest countersigned epsilon so far

    @classmethod
    def nothing(cls) -> TrainOutcome:
        """No training (round 0: the base model evaluated)."""
        return cls(
            clients=0, declined=0, rejections={}, clipped=0, norm_bound=None, train_loss=None, epsilon={}
        )


@dataclass(frozen=True)
class EvalOutcome:
    """What a round's evaluation replies came to: the exact losses sites declared public
    (token-weighted, and as per-record means), and the losses released under DP, as the
    uniform mean of each site's estimate with the standard deviation of its noise
    (`site_metrics.py`); each site's largest countersigned epsilon after it."""

    clients: int = 0
    val_loss: float | None = None
    val_bpb: float | None = None
    record_val_loss: float | None = None
    record_val_bpb: float | None = None
    dp: SiteMetrics | None = None
    epsilon: dict[str, float] = dataclasses.field(default_factory=dict)


class FedglmAvg:
    """Federated averaging of validated compressed updates; see the module docstring."""

    def __init__(
        self,
        *,
        model: GlobalModel,
        ledgers: LedgerCheck,
        settings: RoundConfig,
        compression: CompressionConfig,
        min_clients: int,
        fraction_train: float = 1.0,
        weighting: Weighting = "uniform",
        max_update_norm: float = math.inf,
        aggregation: Aggregation = "mean",
        trim_fraction: float = 0.2,
        site_metrics: SiteMetricsPool | None = None,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        check_trim_fraction(trim_fraction)
        if settings.run_key is None:
            raise ValueError("the round settings need the run key")
        self.model = model
        self.ledgers = ledgers
        self.settings = settings  # the run's part of every round's config
        self.compression = compression
        self.min_clients = min_clients
        self.fraction_train = fraction_train
        self.weighting = weighting
        self.max_update_norm = max_update_norm
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.site_metrics = site_metrics or SiteMetricsPool(None)
        self.exhausted: set[int] = set()  # nodes that declined a round: their budget is spent
        if aggregation != "mean" and weighting != "uniform":
            log(
                WARNING,
                "aggregation %s counts every site once: %s weights are ignored",
                aggregation,
                weighting,
            )
        self._allocate()

    def _allocate(self) -> None:
        self._sum = {
            name: np.zeros(math.prod(s), dtype=np.float32) for name, s in self.model.update_shapes.items()
        }

    def summary(self) -> None:
        up, down = self.compression.uplink, self.compression.downlink
        rule = self.aggregation + (f"@{self.trim_fraction:g}" if self.aggregation == "trimmed-mean" else "")
        log(
            INFO,
            "FedglmAvg: min_clients=%d fraction_train=%.2f weighting=%s aggregation=%s uplink=%s@%g "
            "downlink=%s@%g",
            self.min_clients,
            self.fraction_train,
            self.weighting,
            rule,
            up.codec,
            up.density,
            down.codec,
            down.density,
        )

    def round_config(self, server_round: int) -> RoundConfig:
        """The config every site asked in `server_round` gets (`protocol.py`)."""
        up = self.compression.uplink
        uplink = LinkConfig(codec=up.codec, density=up.density_for(server_round), selection=up.selection)
        return dataclasses.replace(
            self.settings, server_round=server_round, uplink=uplink, mask=self.model.mask_json
        )

    def _nodes(self, grid: Grid, fraction: float, kind: str) -> list[int]:
        """Sample nodes once `min_clients` are connected; training leaves out exhausted nodes
        (none if fewer than `min_clients` would remain)."""
        sample_nodes(grid, self.min_clients, self.min_clients)  # waits for the first nodes
        available = list(grid.get_node_ids())
        if kind == MessageType.TRAIN:
            available = [n for n in available if n not in self.exhausted]
            if len(available) < self.min_clients:
                return []
        size = min(len(available), max(int(len(available) * fraction), self.min_clients))
        return random.sample(available, size)

    def _messages(self, grid: Grid, server_round: int, fraction: float, kind: str) -> list[Message]:
        node_ids = self._nodes(grid, fraction, kind)
        # The window tells sites in training rounds too that metrics will be asked for (their
        # calibrated noise leaves room for them).
        settings = dataclasses.replace(
            self.round_config(server_round), metrics_window=self.site_metrics.window
        )
        config = settings.to_record()
        # Nodes sent the same payload share one content object (it is serialized once).
        contents: dict[int, RecordDict] = {}
        messages = []
        for node in node_ids:
            blob = self.model.payload_for(node, server_round)
            if id(blob) not in contents:
                contents[id(blob)] = RecordDict({ARRAYS_KEY: payload_record(blob), CONFIG_KEY: config})
            content = contents[id(blob)]
            receipts = self.ledgers.receipts_for(node)
            if receipts:
                content = RecordDict({**content, RECEIPT_KEY: receipts_record(receipts)})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        return messages

    def train_messages(self, server_round: int, grid: Grid) -> list[Message]:
        """Prune if the schedule says so, then one TRAIN message per sampled site ([] when too
        few sites have budget left)."""
        if self.model.prune(server_round):
            self._allocate()
        return self._messages(grid, server_round, self.fraction_train, MessageType.TRAIN)

    def evaluate_messages(self, server_round: int, grid: Grid) -> list[Message]:
        return self._messages(grid, server_round, 1.0, MessageType.EVALUATE)

    def full_model(self, message: Message) -> Message:
        """The same message with the full model, for a node that answered `stale-model`."""
        node = message.metadata.dst_node_id
        config = message.content.config_records[CONFIG_KEY]
        server_round = RoundConfig.from_record(config).server_round or 0
        content = RecordDict(
            {ARRAYS_KEY: payload_record(self.model.full(node, server_round)), CONFIG_KEY: config}
        )
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)

    def train_outcome(self, server_round: int, replies: Iterable[Message]) -> TrainOutcome:
        """Check every reply, combine the updates that pass, and move the global model."""
        good, declined = [], 0
        for reply in _successful(replies, server_round):
            ledger = reply.content.config_records.get(LEDGER_KEY)
            if ledger is not None and "declined" in ledger:
                self.exhausted.add(reply.metadata.src_node_id)
                declined += 1
                node = reply.metadata.src_node_id
                log(INFO, "round %d: node %d %s", server_round, node, site_text(ledger["declined"]))
            else:
                good.append(reply)
        weights = self._weights([_metrics(r) for r in good], server_round)
        rejected: Counter[str] = Counter()
        checked: list[tuple[Message, float, bytes, float]] = []  # reply, weight, payload, norm
        for reply, weight in zip(good, weights, strict=True):
            try:
                blob, norm = self._check(reply, server_round)
            except PayloadError as exc:
                rejected[exc.reason] += 1
                log(
                    WARNING,
                    "round %d: left out the update of node %d (%s): %s",
                    server_round,
                    reply.metadata.src_node_id,
                    exc.reason,
                    site_text(str(exc)),  # it may quote what the site sent
                )
                continue
            checked.append((reply, weight, blob, norm))
        bound = norm_bound([norm for *_, norm in checked], self.max_update_norm)
        self._combine(checked, bound)
        self.model.finish_train(
            self._sum if checked else None,
            server_round,
            [reply.metadata.src_node_id for reply, *_ in checked],
            self.compression.downlink,
        )
        losses = _mean_metrics([_metrics(reply) for reply, *_ in checked], ("train_loss",))
        return TrainOutcome(
            clients=len(checked),
            declined=declined,
            rejections=dict(rejected),
            clipped=sum(1 for *_, norm in checked if norm > bound),
            norm_bound=bound if math.isfinite(bound) else None,
            train_loss=losses.get("train_loss"),
            epsilon=self.ledgers.epsilon(),
        )

    def _check(self, reply: Message, server_round: int) -> tuple[bytes, float]:
        """The reply's payload, checked in full with its ledger entry, and its update's norm;
        `PayloadError` if it may not count."""
        blob = read_payload(reply.content)
        if blob is None:
            raise PayloadError("the reply carries dense tensors, not a fedglm payload", "bad-record")
        header, tensors = decode(blob, self.model.update_shapes)
        check_header(header, kind=Kind.UPDATE, round=server_round, base=self.model.hash)
        self.ledgers.check(reply, blob, server_round, self.model.hash)
        return blob, update_norm(tensors.values())

    def _combine(self, checked: list[tuple[Message, float, bytes, float]], bound: float) -> None:
        # An update over the bound is scaled down to it (`combine.py`).
        scales = [bound / norm if norm > bound else 1.0 for *_, norm in checked]
        blobs = [blob for _, _, blob, _ in checked]
        shapes = self.model.update_shapes
        if self.aggregation == "mean":
            weighted_mean(self._sum, blobs, [weight for _, weight, _, _ in checked], scales, shapes)
        else:
            robust_combine(self._sum, blobs, scales, shapes, self.aggregation, self.trim_fraction)

    def evaluate_outcome(self, server_round: int, replies: Iterable[Message]) -> EvalOutcome:
        good = _successful(replies, server_round)
        self.model.finish_evaluate(reply.metadata.src_node_id for reply in good)
        released: list[LedgerLine] = []
        for reply in good:
            try:
                line = self.ledgers.metrics(reply, server_round, self.model.hash)
            except PayloadError as exc:
                node = reply.metadata.src_node_id
                log(
                    WARNING,
                    "round %d: left out the metrics of node %d: %s",
                    server_round,
                    node,
                    site_text(str(exc)),
                )
                continue
            if line is not None:
                released.append(line)
        losses = _mean_metrics(
            [_metrics(r) for r in good], ("val_loss", "val_bpb", "record_val_loss", "record_val_bpb")
        )
        return EvalOutcome(
            clients=len(good),
            val_loss=losses.get("val_loss"),
            val_bpb=losses.get("val_bpb"),
            record_val_loss=losses.get("record_val_loss"),
            record_val_bpb=losses.get("record_val_bpb"),
            dp=self.site_metrics.pool(released, server_round),
            epsilon=self.ledgers.epsilon(),
        )

    def _weights(self, metrics: list[MetricRecord], server_round: int) -> list[float]:
        if self.weighting == "uniform":
            return [1.0] * len(metrics)
        if not all(site_number(m, "records-public") == 1 for m in metrics):
            log(
                WARNING,
                "round %d: a site did not declare its record count public; averaging uniformly this round",
                server_round,
            )
            return [1.0] * len(metrics)
        counts = [site_number(m, "weight") or 0.0 for m in metrics]
        if any(c <= 0 for c in counts):
            log(WARNING, "round %d: a record count is not positive; averaging uniformly", server_round)
            return [1.0] * len(metrics)
        return counts


def _metrics(reply: Message) -> MetricRecord:
    return reply.content.metric_records.get(METRICS_KEY, MetricRecord())


def _successful(replies: Iterable[Message], server_round: int) -> list[Message]:
    good = []
    for reply in replies:
        if reply.has_error():
            log(
                WARNING,
                "round %d: node %d replied with an error: %s",
                server_round,
                reply.metadata.src_node_id,
                site_text(reply.error.reason),
            )
        else:
            good.append(reply)
    return good


def _mean_metrics(records: list[MetricRecord], keys: tuple[str, ...]) -> dict[str, float]:
    """Uniform mean of each key over the records that report a finite number for it."""
    out: dict[str, float] = {}
    for key in keys:
        values = [v for v in (site_number(r, key) for r in records) if v is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out
