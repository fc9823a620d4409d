"""The privacy step of the coordinator's round, apart from the averaging.

With `federation.require_dp` (the default) an update counts only with a ledger entry that the
countersigner accepts (`countersign.py`: it names this run, this round, the model sent and the
update's own bytes, continues the site's countersigned chain, and comes from the node listed
for that site); the receipts go back to the site with its next message. Without it, an update
may come without a ledger entry, and an entry sent anyway is still checked. The strategy calls
`check` for each update before it counts, as Flower's DP wrappers sit around a strategy.
"""

from __future__ import annotations

from flwr.app import Message

from fedglm.payload import LEDGER_KEY, PayloadError
from fedglm.privacy.ledger import LedgerLine
from fedglm.server.countersign import BAD_LEDGER, Countersigner


class LedgerCheck:
    """Whether an update may count, by its ledger entry; the receipts and epsilons it yields."""

    def __init__(self, countersigner: Countersigner | None, *, required: bool) -> None:
        if required and countersigner is None:
            raise ValueError("require_dp needs a countersigner")
        self.countersigner = countersigner
        self.required = required

    def check(self, reply: Message, blob: bytes, server_round: int, base: bytes) -> None:
        """Raise `PayloadError` unless the update `blob` in `reply` may count (see above)."""
        ledger = reply.content.config_records.get(LEDGER_KEY)
        if ledger is None:
            if self.required:
                raise PayloadError("the update comes without a ledger entry (DP is required)", "no-ledger")
            return
        self._countersigner().countersign(reply.metadata.src_node_id, dict(ledger), blob, server_round, base)

    def metrics(self, reply: Message, server_round: int, base: bytes) -> LedgerLine | None:
        """The countersigned line of the metrics `reply` releases under DP; None if it releases
        none (or declined to); `PayloadError` if its line may not count."""
        ledger = reply.content.config_records.get(LEDGER_KEY)
        if ledger is None or "declined" in ledger:
            return None
        return self._countersigner().countersign(
            reply.metadata.src_node_id, dict(ledger), None, server_round, base
        )

    def _countersigner(self) -> Countersigner:
        if self.countersigner is None:
            raise PayloadError("this coordinator has no receipt key to countersign ledgers", BAD_LEDGER)
        return self.countersigner

    def receipts_for(self, node: int) -> list[str]:
        """The receipts to send with the next message to `node`, once."""
        return self.countersigner.receipt_for(node) if self.countersigner else []

    def epsilon(self) -> dict[str, float]:
        """Each site's largest countersigned epsilon so far (across restarts)."""
        return dict(sorted(self.countersigner.epsilon.items())) if self.countersigner else {}
