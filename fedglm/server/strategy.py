"""fedglm's aggregation strategy: federated averaging (or a robust rule) of compressed, checked updates.

It keeps Flower's four strategy verbs (`configure_train`, `aggregate_train`,
`configure_evaluate`, `aggregate_evaluate`), driven by fedglm's own round loop. The model
itself lives in a `Broadcast` (the copy every client holds); messages carry compressed
payloads (`compression/FORMAT.md`), never the model as dense tensors.
- Each reply's payload is parsed and checked in full (format, checksum, names, shapes, index
  ranges, finite values, the round and the model it was built on) before any of it is added;
  a bad payload leaves that client out of the round, logged and counted by reason.
- Accepted updates are decoded one at a time into one preallocated fp32 accumulator: memory
  is linear in the model size, not in the number of clients.
- With DP required (the default), an update is accepted only with a ledger entry that matches
  it (`countersign.py`); the coordinator countersigns it and sends the receipt back. A site
  that declines a round (its budget would be exceeded) is not selected for training again.
- At the rounds of the pruning schedule, the global model (with LoRA: merged with its
  adapters) is ranked and sliced before the round's messages are built (`fedglm/pruning.py`);
  every later message carries the mask.
- Each site's contribution is bounded: an update whose L2 norm exceeds the round's bound is
  scaled down to it (clipped, not rejected: an honest site with an unusually large update
  still counts, with bounded influence). The bound is the smaller of the coordinator's
  `federation.max_update_norm` and, with at least three sites, `ADAPTIVE_FACTOR` times the
  lower median of the round's update norms, so a minority of sites cannot move the model much
  further than honest sites do, and the aggregate stays finite whatever arrives. Clipped
  updates and the bound are reported in `metrics.jsonl`.
- Weights are uniform by default, because a site's record count is private; a coordinator may
  ask for record-count weights, used only in a round where every replying site declared its
  count public.
- `federation.aggregation` chooses how the clipped updates are combined: `mean` (the default,
  the weighted mean above), or the coordinate-wise `trimmed-mean` or `median` (`robust.py`:
  tolerant to a minority of hostile sites, weights ignored). The robust rules decode the
  updates tensor by tensor, so their extra memory is (number of sites) x (largest tensor).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType, log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedglm.compression import CODEC_IDS, CODECS, Decoded, Kind, PayloadError, check_header, decode
from fedglm.compression.update import payload_limit
from fedglm.compression.wire import unpack
from fedglm.config import CompressionConfig, PruningConfig
from fedglm.lora import merge_adapters
from fedglm.model import GLMArgs
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
from fedglm.pruning import MASK_KEY, Mask, choose_mask, slice_state
from fedglm.server.broadcast import Broadcast
from fedglm.server.countersign import BAD_LEDGER, Countersigner
from fedglm.server.robust import ROBUST_RULES, aggregate, check_trim_fraction

Weighting = Literal["uniform", "records"]
Aggregation = Literal["mean", "trimmed-mean", "median"]
AGGREGATIONS: tuple[Aggregation, ...] = ("mean", *ROBUST_RULES)
REJECTED_PREFIX = "rejected/"
ADAPTIVE_FACTOR = 4.0  # a site's update may be this many times the round's lower-median norm


def update_norm(tensors: Iterable[Decoded]) -> float:
    """The L2 norm of a decoded update, in float64 (finite for any finite fp32 values)."""
    total = 0.0
    for tensor in tensors:
        values = tensor.values.astype(np.float64)
        total += float(np.dot(values, values))
    return math.sqrt(total)


class FedglmAvg:
    """Federated averaging of validated compressed updates; see the module docstring."""

    def __init__(
        self,
        *,
        broadcast: Broadcast,
        compression: CompressionConfig,
        run_key: str,
        min_clients: int,
        fraction_train: float = 1.0,
        weighting: Weighting = "uniform",
        countersigner: Countersigner | None = None,
        require_dp: bool = True,
        model_args: GLMArgs | None = None,
        pruning: PruningConfig | None = None,
        mask: Mask | None = None,
        lora_scale: float | None = None,
        max_update_norm: float = math.inf,
        aggregation: Aggregation = "mean",
        trim_fraction: float = 0.2,
    ) -> None:
        if require_dp and countersigner is None:
            raise ValueError("require_dp needs a countersigner")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        check_trim_fraction(trim_fraction)
        if (pruning is not None or mask is not None) and model_args is None:
            raise ValueError("pruning needs the unpruned model's args")
        self.broadcast = broadcast
        self.compression = compression
        self.run_key = run_key
        self.min_clients = min_clients
        self.fraction_train = fraction_train
        self.weighting = weighting
        self.countersigner = countersigner
        self.require_dp = require_dp
        self.exhausted: set[int] = set()  # nodes that declined a round: their budget is spent
        self.model_args = model_args
        self.pruning = pruning or PruningConfig()
        self.mask = mask or (Mask.full(model_args) if model_args is not None else None)
        self.lora_scale = lora_scale  # set when sites train LoRA adapters: rank the merged model
        self.max_update_norm = max_update_norm
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
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
            name: np.zeros(math.prod(s), dtype=np.float32) for name, s in self.broadcast.update_shapes.items()
        }

    @property
    def mask_json(self) -> str:
        """The current pruning mask as sent to sites; "" while the model is unpruned."""
        if self.mask is None or self.model_args is None or self.mask == Mask.full(self.model_args):
            return ""
        return self.mask.to_json()

    def _prune(self, server_round: int) -> None:
        step = self.pruning.step_at(server_round)
        if step is None or self.mask is None or self.model_args is None:
            return
        args, held = self.model_args, self.mask
        state = self.broadcast.state
        ranked = state if self.lora_scale is None else merge_adapters(state, self.lora_scale)
        target = choose_mask(ranked, args, held, heads=step.heads, channels=step.channels)
        if target == held:
            return
        self.broadcast.reshape(lambda state: slice_state(state, args, held, target))
        self.mask = target
        self._allocate()
        heads, channels = target.kept()
        log(
            INFO,
            "round %d: pruned the global model to %d heads and %d channels",
            server_round,
            heads,
            channels,
        )

    def summary(self) -> None:
        up, down = self.compression.uplink, self.compression.downlink
        rule: str = self.aggregation
        if rule == "trimmed-mean":
            rule += f"@{self.trim_fraction:g}"
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

    def _messages(
        self, grid: Grid, server_round: int, config: ConfigRecord, fraction: float, kind: str
    ) -> list[Message]:
        node_ids = self._nodes(grid, fraction, kind)
        config["server-round"] = server_round
        config["run-key"] = self.run_key
        up = self.compression.uplink
        config["uplink.codec"] = up.codec
        config["uplink.density"] = up.density_for(server_round)
        config["uplink.selection"] = up.selection
        mask = self.mask_json
        if mask:
            config[MASK_KEY] = mask
        # Nodes sent the same payload share one content object (it is serialized once).
        contents: dict[int, RecordDict] = {}
        messages = []
        for node in node_ids:
            blob = self.broadcast.payload_for(node, server_round)
            if id(blob) not in contents:
                contents[id(blob)] = RecordDict({ARRAYS_KEY: payload_record(blob), CONFIG_KEY: config})
            content = contents[id(blob)]
            receipts = self.countersigner.receipt_for(node) if self.countersigner else []
            if receipts:
                content = RecordDict({**content, RECEIPT_KEY: ConfigRecord({"lines": receipts})})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        return messages

    def configure_train(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        self._prune(server_round)
        return self._messages(grid, server_round, config, self.fraction_train, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        return self._messages(grid, server_round, config, 1.0, MessageType.EVALUATE)

    def full_model(self, message: Message) -> Message:
        """The same message with the full model, for a node that answered `stale-model`."""
        node = message.metadata.dst_node_id
        self.broadcast.forget(node)
        config = ConfigRecord(dict(message.content.config_records[CONFIG_KEY]))
        server_round = int(config["server-round"])
        content = RecordDict(
            {ARRAYS_KEY: payload_record(self.broadcast.full(server_round)), CONFIG_KEY: config}
        )
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = []
        declined = 0
        for reply in _successful(replies, server_round):
            ledger = reply.content.config_records.get(LEDGER_KEY)
            if ledger is not None and "declined" in ledger:
                self.exhausted.add(reply.metadata.src_node_id)
                declined += 1
                log(
                    INFO,
                    "round %d: node %d %s",
                    server_round,
                    reply.metadata.src_node_id,
                    site_text(ledger["declined"]),
                )
            else:
                good.append(reply)
        weights = self._weights([_metrics(r) for r in good], server_round)
        rejected: Counter[str] = Counter()
        checked: list[tuple[Message, float, bytes, float]] = []  # reply, weight, payload, norm
        for reply, weight in zip(good, weights, strict=True):
            try:
                blob = read_payload(reply.content)
                if blob is None:
                    raise PayloadError("the reply carries dense tensors, not a fedglm payload", "bad-record")
                header, tensors = decode(blob, self.broadcast.update_shapes)
                check_header(header, kind=Kind.UPDATE, round=server_round, base=self.broadcast.hash)
                self._countersign(reply, blob, server_round)
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
            checked.append((reply, weight, blob, update_norm(tensors.values())))
        bound = self._norm_bound([norm for *_, norm in checked])
        # An update over the bound is scaled down to it (see the module docstring).
        scales = [bound / norm if norm > bound else 1.0 for *_, norm in checked]
        blobs = [blob for _, _, blob, _ in checked]
        if self.aggregation == "mean":
            self._weighted_mean(blobs, [weight for _, weight, _, _ in checked], scales)
        else:
            self._robust(blobs, scales)
        accepted: list[MetricRecord] = []
        for reply, *_ in checked:
            accepted.append(_metrics(reply))
            self.broadcast.holds(reply.metadata.src_node_id)
        metrics = _mean_metrics(accepted, ("train_loss",))
        metrics["clients"] = len(accepted)
        metrics["declined"] = declined
        metrics["clipped"] = sum(1 for *_, norm in checked if norm > bound)
        if math.isfinite(bound):
            metrics["update-norm-bound"] = bound
        for reason, count in rejected.items():
            metrics[REJECTED_PREFIX + reason] = count
        if not accepted:
            return metrics
        down = self.compression.downlink
        self.broadcast.advance(
            self._sum, server_round, codec=CODECS[down.codec], density=down.density, selection=down.selection
        )
        return metrics

    def _weighted_mean(self, blobs: list[bytes], weights: list[float], scales: list[float]) -> None:
        """`self._sum` = the weighted mean of the clipped updates (zero without any update)."""
        for total in self._sum.values():
            total.fill(0.0)
        weight_sum = 0.0
        for blob, weight, scale in zip(blobs, weights, scales, strict=True):
            # Decoded again rather than kept: memory stays linear in the model, not in the sites.
            _, tensors = decode(blob, self.broadcast.update_shapes)
            for name, change in tensors.items():
                change.add_to(self._sum[name], weight * scale)
            weight_sum += weight
        if blobs:
            for total in self._sum.values():
                total *= np.float32(1.0 / weight_sum)

    def _robust(self, blobs: list[bytes], scales: list[float]) -> None:
        """`self._sum` = the robust rule applied to the clipped updates, tensor by tensor.

        Each payload's table is parsed once (its bodies stay views into the payload); each
        tensor is then decoded from every payload into one (sites, size) stack, so at most one
        tensor's values from every site are held at a time. A tensor a sparse payload left out
        is zero for that site. The payloads were fully checked by `decode` already."""
        if not blobs:
            for total in self._sum.values():
                total.fill(0.0)
            return
        shapes = self.broadcast.update_shapes
        limit = payload_limit(shapes)
        tables = []
        for blob in blobs:
            payload = unpack(blob, shapes, limit)
            tables.append((CODEC_IDS[payload.header.codec_id], {t.name: t.body for t in payload.tensors}))
        rule = self.aggregation
        assert rule != "mean"
        for name, total in self._sum.items():
            stacked = np.zeros((len(blobs), total.size), dtype=np.float32)
            for row, ((codec, bodies), scale) in enumerate(zip(tables, scales, strict=True)):
                body = bodies.get(name)
                if body is not None:
                    codec.decode(body, total.size).add_to(stacked[row], scale)
            total[:] = aggregate(stacked, rule, self.trim_fraction)
            del stacked  # freed before the next tensor's stack is allocated

    def _norm_bound(self, norms: list[float]) -> float:
        """The largest L2 norm one site's update may have this round (see the module docstring)."""
        positive = sorted(n for n in norms if n > 0)
        adaptive = ADAPTIVE_FACTOR * positive[(len(positive) - 1) // 2] if len(positive) >= 3 else math.inf
        return min(self.max_update_norm, adaptive)

    def _countersign(self, reply: Message, blob: bytes, server_round: int) -> None:
        ledger = reply.content.config_records.get(LEDGER_KEY)
        if ledger is None:
            if self.require_dp:
                raise PayloadError("the update comes without a ledger entry (DP is required)", "no-ledger")
            return
        if self.countersigner is None:
            raise PayloadError("this coordinator has no receipt key to countersign ledgers", BAD_LEDGER)
        self.countersigner.countersign(
            reply.metadata.src_node_id, dict(ledger), blob, server_round, self.broadcast.hash
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = _successful(replies, server_round)
        for reply in good:
            self.broadcast.holds(reply.metadata.src_node_id)
        if not good:
            return None
        metrics = _mean_metrics([_metrics(r) for r in good], ("val_loss", "val_bpb"))
        metrics["clients"] = len(good)
        return metrics

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


def _mean_metrics(records: list[MetricRecord], keys: tuple[str, ...]) -> MetricRecord:
    """Uniform mean of each key over the records that report a finite number for it."""
    out = MetricRecord()
    for key in keys:
        values = [v for v in (site_number(r, key) for r in records) if v is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out
