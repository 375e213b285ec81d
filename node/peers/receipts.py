"""The node's side of the ledger: receipts issued for peers, receipts taken from them, and the
countersignatures that go back in batches.

A provider commits each receipt before the response is complete (`store.ledger.issue_receipts`,
the receipts asked for together in one transaction), after the request's usage record was
appended to the journal: a completed request always has its receipt and its usage record, and
a crash never leaves a gap in a chain. The consumer verifies what it gets, countersigns it and
appends it to its own copy of the chain off the request path (the signatures of a batch on a
worker thread, so that they hold no request in flight); if it loses one in a crash,
reconciliation recovers it from the provider's signed copy. The provider checks the
countersignatures that come back the same way, against its stored bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from federation.descriptors import public_key_of
from federation.identity import NodeIdentity
from ledger.canonical import b64url_decode
from ledger.receipts import (
    GENESIS,
    Receipt,
    SentRequest,
    UnseenAdvert,
    check_billing,
    countersign,
    parse_receipt,
    receipt_fields,
    signed_receipt,
    take_receipt,
)
from ledger.records import RecordError, signed_bytes, verify_bytes
from node.peers.batches import TurnBatch
from node.storage.base import Store
from node.storage.records import (
    Charge,
    LinkedReceipt,
    ReceiptMaker,
    StoredReceipt,
    body_hash,
)

if TYPE_CHECKING:
    # Types only: the ledger's commands use this module's reading of receipts, not the
    # peer transport that the running node's `Receipts` sends countersignatures with.
    import httpx

    from node.peers.peering import Peer, Peering

log = logging.getLogger("aihub.ledger")

COUNTERSIGNATURE_BATCH = 500
# Batches sent to one provider in one turn of the job (every `COUNTERSIGN_INTERVAL`): up to
# 10,000 countersignatures a turn, 5,000 a second, more than a node serves a peer.
COUNTERSIGNATURE_BATCHES = 20
# Receipts taken within this long of each other are kept in one transaction.
TAKE_DELAY = 0.05


class _Taken(NamedTuple):
    sent: SentRequest  # the request it must be the receipt of
    data: bytes
    our_cost: int


class _Issue(NamedTuple):
    charge: Charge
    consumer: str
    receipt_id: str
    key_id: str


class Kept(NamedTuple):
    """What became of receipts offered to our chains: how many are in them now (new or
    known), those refused (with why), and whether a provider was caught equivocating."""

    kept: list[Receipt]
    refused: list[tuple[Receipt, str]]
    equivocated: bool


class Countersignature(msgspec.Struct, frozen=True):
    seq: int
    id: str
    csig: str


class Countersignatures(msgspec.Struct, frozen=True):
    csigs: list[Countersignature]


def stored(receipt: Receipt, signed: bytes | None = None) -> StoredReceipt:
    """A receipt as the ledger table keeps it: the bytes its provider signed (`signed`, if
    they are at hand: `signed_receipt`), and its csig. Its hash is of those very bytes
    (`receipt_hash`, without encoding them a second time)."""
    if signed is None:
        signed = signed_bytes(receipt_fields(receipt), "csig")
    body = signed.decode()
    return StoredReceipt(
        provider=receipt.provider,
        consumer=receipt.consumer,
        seq=receipt.seq,
        id=receipt.id,
        hash=body_hash(body),
        amount=receipt.amount,
        iat=receipt.iat,
        body=body,
        csig=receipt.csig or None,
    )


def loaded(row: StoredReceipt) -> Receipt:
    """The receipt a stored row holds, with its countersignature if it has one."""
    receipt = parse_receipt(row.body)
    return msgspec.structs.replace(receipt, csig=row.csig) if row.csig else receipt


class Receipts:
    def __init__(
        self, identity: NodeIdentity, store: Store, client: httpx.AsyncClient, peering: Peering
    ) -> None:
        self.identity = identity
        self.store = store
        self.client = client
        self.peering = peering
        self._taken: list[_Taken] = []
        self._taker: asyncio.Task[None] | None = None
        self._issuing = TurnBatch(self._issue_batch, "ledger-issue")

    # --- the provider's side --------------------------------------------------------------

    async def issue(self, charge: Charge, consumer: str, receipt_id: str, key_id: str) -> bytes:
        """Sign and commit our receipt for a peer's request (its usage record is the
        journal's: `Accounting.finish`); the receipt's signed JSON, for the response. The
        receipts asked for in the same turn of the event loop (peers' answers that came in
        together) share one transaction: one commit for all of them, which costs about as
        much as the rest of a receipt (`TurnBatch`: written by a task of their own, one by
        one if the batch fails; one alone in its turn by its requester). A request that went
        away meanwhile still has its receipt written: its answer was paid for."""
        return await self._issuing.ask(_Issue(charge, consumer, receipt_id, key_id))

    async def _issue_batch(self, batch: Sequence[_Issue]) -> list[bytes]:
        issued = [((self.identity.node_id, i.consumer), self._maker(i)) for i in batch]
        rows = await self.store.ledger.issue_receipts(issued)
        return [row.body.encode() for row in rows]

    def _maker(self, item: _Issue) -> ReceiptMaker:
        record = item.charge.record
        me = self.identity.node_id

        def make(seq: int, prev: str | None) -> StoredReceipt:
            receipt, signed = signed_receipt(
                self.identity.sign,
                id=item.receipt_id,
                provider=me,
                consumer=item.consumer,
                key_id=item.key_id,
                model=record.model,
                tokens_in=record.tokens_in,
                tokens_out=record.tokens_out,
                amount=record.cost_micros,
                price_seq=self.peering.advert_seq,
                seq=seq,
                prev=prev or GENESIS,
            )
            return stored(receipt, signed)

        return make

    async def take_countersignatures(self, consumer: str, body: bytes) -> int:
        """Countersignatures a consumer sends back for receipts we issued: each checked
        against our copy and the consumer's key; the number stored."""
        batch = msgspec.json.decode(body, type=Countersignatures)
        key = public_key_of(consumer)
        me = self.identity.node_id
        items = {item.seq: item for item in batch.csigs[:COUNTERSIGNATURE_BATCH]}
        held = [
            (row, items[row.seq].csig)
            for row in await self.store.ledger.receipts_at(me, consumer, sorted(items))
            if row.id == items[row.seq].id and row.csig is None
        ]
        # Up to 500 Ed25519 checks (a tenth of a second of this machine's core) run off the
        # event loop: libsodium lets go of the GIL while it checks, so requests go on being
        # served meanwhile instead of waiting for the whole batch.
        good = await asyncio.to_thread(_countersigned, held, key, consumer)
        return await self.store.ledger.add_countersignatures(me, consumer, good, to_send=False)

    # --- the consumer's side --------------------------------------------------------------

    def take(self, sent: SentRequest, data: bytes, our_cost: int) -> None:
        """A receipt that came with a peer's answer to `sent`: checked, countersigned and
        kept off the request path, with the others that came in the next few milliseconds."""
        self._taken.append(_Taken(sent, data, our_cost))
        if self._taker is None:
            self._taker = asyncio.create_task(self._take_batches(), name="ledger-take")

    async def _take_batches(self) -> None:
        try:
            while self._taken:
                await asyncio.sleep(TAKE_DELAY)
                batch, self._taken = self._taken, []
                try:
                    await self.keep_all(await self._checked_all(batch))
                except Exception:
                    # Reconciliation recovers them from the provider's signed copies.
                    log.exception("could not keep %d receipts", len(batch))
        finally:
            self._taker = None

    async def _checked_all(self, batch: list[_Taken]) -> list[Receipt]:
        """The receipts of a batch that may be taken, countersigned. One priced under an
        advert seq we do not hold yet is checked again once its provider's advert is fetched
        (a provider takes a new seq at every start, and we may not have heard yet)."""
        receipts, unseen = await self._checked_off_loop(batch, last_try=False)
        for provider in {taken.sent.peer for taken in unseen}:
            peer = self.peering.peers.get(provider)
            if peer is not None:
                await self.peering.refresh_advert(peer)
        if unseen:
            receipts += (await self._checked_off_loop(unseen, last_try=True))[0]
        return receipts

    async def _checked_off_loop(
        self, batch: list[_Taken], *, last_try: bool
    ) -> tuple[list[Receipt], list[_Taken]]:
        """`_checked` for each of a batch, on a worker thread: each receipt is a signature
        check and a countersignature (Ed25519, during which libsodium lets go of the GIL), and
        a batch of them on the event loop would hold every request in flight meanwhile. The
        adverts' seqs are read here, on the loop that changes them. The receipts taken, and
        those priced under an advert we do not hold (refused, on the `last_try`)."""
        seqs = {taken.sent.peer: self._advert_seq(taken.sent.peer) for taken in batch}
        return await asyncio.to_thread(self._checked_batch, batch, seqs, last_try)

    def _checked_batch(
        self, batch: list[_Taken], seqs: dict[str, int], last_try: bool
    ) -> tuple[list[Receipt], list[_Taken]]:
        receipts, unseen = [], []
        for taken in batch:
            try:
                receipts.append(self._checked(taken, seqs[taken.sent.peer]))
            except UnseenAdvert as exc:
                if last_try:
                    log.warning("refused a receipt from %s: %s", taken.sent.peer, exc)
                else:
                    unseen.append(taken)
            except (RecordError, ValueError) as exc:
                log.warning("refused a receipt from %s: %s", taken.sent.peer, exc)
        return receipts, unseen

    def _advert_seq(self, provider: str) -> int:
        """The seq of the newest advert we hold of `provider`'s (0 if none)."""
        peer = self.peering.peers.get(provider)
        return peer.advert.seq if peer is not None and peer.advert is not None else 0

    def _checked(self, taken: _Taken, advert_seq: int | None = None) -> Receipt:
        """The receipt, verified against the request it answered, and countersigned;
        RecordError (UnseenAdvert for an advert seq we do not hold: `advert_seq`, looked up
        if not given) or ValueError if it is refused."""
        provider = taken.sent.peer
        # In a header it is base64url (headers are ASCII); in a stream event, the JSON.
        data = taken.data
        signed = data if data.startswith(b"{") else b64url_decode(data.decode())
        receipt = take_receipt(
            signed,
            me=self.identity.node_id,
            sender=provider,
            sent=taken.sent,
            advert_seq=self._advert_seq(provider) if advert_seq is None else advert_seq,
        )
        if receipt.amount > taken.our_cost:
            # Its tokens count more than the answer we got said: kept (it is within the
            # advertised prices, and what they signed) but said, for the admin.
            log.warning(
                "receipt %d from %s charges %d, more than the advertised %d",
                receipt.seq,
                provider,
                receipt.amount,
                taken.our_cost,
            )
        return countersign(receipt, self.identity.sign)

    async def keep(self, receipt: Receipt) -> bool:
        """Append a receipt taken under the rule to our copy of its chain (see
        `keep_receipts`); whether it is in the chain now."""
        return bool((await self.keep_all([receipt])).kept)

    async def keep_all(self, receipts: list[Receipt]) -> Kept:
        """Append receipts taken under the rule to our copies of their chains (see
        `keep_receipts`); a provider caught equivocating stops being routed to at once."""
        if not receipts:
            return Kept([], [], False)
        kept = await keep_receipts(self.store, receipts)
        if kept.equivocated:
            await self.peering.changed()
        return kept

    async def send_countersignatures(self) -> None:
        """Send our countersignatures to each provider, in batches, off the request path:
        every batch waiting, up to `COUNTERSIGNATURE_BATCHES` of them a provider a turn (one
        batch a turn capped what a consumer could send at 250 a second: a busy consumer fell
        further behind for as long as it stayed busy). The providers at once: one that is
        slow to answer holds up no other's."""
        peers = list(self.peering.peers.values())
        await asyncio.gather(*(self._send_countersignatures_to(peer) for peer in peers))

    async def _send_countersignatures_to(self, peer: Peer) -> None:
        import httpx

        me, provider, key = self.identity.node_id, peer.node_id, peer.key
        if key is None:  # one that joined us, not we it: it serves us nothing
            return
        for _ in range(COUNTERSIGNATURE_BATCHES):
            batch = await self.store.ledger.unsent_countersignatures(
                me, provider, COUNTERSIGNATURE_BATCH
            )
            if not batch:
                return
            body = msgspec.json.encode(
                Countersignatures([Countersignature(r.seq, r.id, r.csig or "") for r in batch])
            )
            try:
                response = await self.peering.signed(
                    "POST", peer.url + "/federation/countersignatures", key, body
                )
            except httpx.HTTPError as exc:
                log.info("countersignatures to %s not sent (%s)", peer.name, type(exc).__name__)
                return
            if response.status_code != 200:
                return  # sent again next turn
            await self.store.ledger.mark_countersignatures_sent(batch)
            if len(batch) < COUNTERSIGNATURE_BATCH:
                return

    async def settle_tasks(self) -> None:
        """Wait for the receipts being issued and taken (at shutdown, and in tests)."""
        await self._issuing.settle()
        while self._taker is not None:
            await asyncio.wait([self._taker])


def _countersigned(
    held: list[tuple[StoredReceipt, str]], key: bytes, consumer: str
) -> list[tuple[int, str]]:
    """The (seq, csig) of the receipts whose offered csig is `key`'s signature over our stored
    copy: the row's body is exactly what a countersignature covers (the receipt we signed,
    with `sig`, without `csig`, canonical: `stored`), and the rows are the consumer's own
    chain (`receipts_at`), so its bytes are checked as they are, neither decoded nor encoded
    again."""
    good = []
    for row, csig in held:
        try:
            verify_bytes(row.body.encode(), csig, key, "csig")
        except RecordError:
            log.warning("a bad countersignature from %s for seq %d", consumer, row.seq)
            continue
        good.append((row.seq, csig))
    return good


async def keep_receipt(store: Store, receipt: Receipt) -> bool:
    """See `keep_receipts`: whether the receipt is in its chain now."""
    return bool((await keep_receipts(store, [receipt])).kept)


async def keep_receipts(store: Store, receipts: list[Receipt]) -> Kept:
    """Append receipts taken under the rule (`take_receipt`, or our own back from a peer) to
    our copies of their chains. A receipt that does not link with the neighbours we hold,
    or bills a request that has a receipt already, is refused. A provider that signed a
    different receipt for one of those places before has equivocated: proof of cheating, so
    it is suspended (its routes and its key stop working)."""
    by_place = {(r.provider, r.consumer, r.seq): r for r in receipts}
    conflicts, refused = await store.ledger.add_receipts(
        [LinkedReceipt(stored(receipt), receipt.prev) for receipt in receipts]
    )
    for held, offered in conflicts:
        await record_equivocation(store, held, offered)
    out = {(r.provider, r.consumer, r.seq) for r, _ in refused}
    out |= {(r.provider, r.consumer, r.seq) for _, r in conflicts}
    for row, why in refused:
        log.warning("refused receipt seq %d from %s: %s", row.seq, row.provider, why)
    return Kept(
        [r for place, r in by_place.items() if place not in out],
        [(by_place[(r.provider, r.consumer, r.seq)], why) for r, why in refused],
        bool(conflicts),
    )


async def sent_to(store: Store, sender: str, receipts: list[Receipt]) -> dict[str, SentRequest]:
    """Our records of the requests these receipts from `sender` name."""
    return await store.ledger.sent_requests(sender, [r.id for r in receipts])


async def held_advert_seq(store: Store, peer: str) -> int:
    """The seq of the newest advert of `peer`'s we hold (0 if none): verified when it came."""
    record = await store.peers.peer(peer)
    if record is None or not record.advert:
        return 0
    try:
        seq = msgspec.json.decode(record.advert).get("seq", 0)
    except (msgspec.DecodeError, AttributeError):
        return 0
    return seq if type(seq) is int else 0


async def admissible(
    store: Store,
    me: str,
    sender: str,
    receipts: list[Receipt],
    *,
    signatures_checked: bool = False,
) -> tuple[list[Receipt], list[tuple[Receipt, str]]]:
    """Of receipts `sender` handed us as their consumer (say, in reconciliation), those the
    rule lets us take (`take_receipt`: signed by the sender, for a request we sent it, as we
    asked and priced it, under an advert seq we hold), and those refused with why. For
    receipts in our books already (`signatures_checked`), only what they bill is checked
    (`check_billing`)."""
    sent = await sent_to(store, sender, receipts)
    seq = await held_advert_seq(store, sender) if receipts else 0
    taken, refused = [], []
    for receipt in receipts:
        terms = {"me": me, "sender": sender, "sent": sent.get(receipt.id), "advert_seq": seq}
        try:
            if signatures_checked:
                check_billing(receipt, **terms)
                taken.append(receipt)
            else:
                taken.append(take_receipt(receipt, **terms))
        except RecordError as exc:
            refused.append((receipt, str(exc)))
    return taken, refused


async def record_equivocation(store: Store, first: StoredReceipt, second: StoredReceipt) -> None:
    """Two different receipts signed by one provider for one seq of a chain: keep both as
    proof, and suspend the provider (a node never holds a peer row for itself, so our own
    id changes nothing)."""
    await store.ledger.add_equivocation(
        first.provider, first.consumer, first.seq, first.body, second.body
    )
    log.error("peer %s signed two receipts for seq %d: suspended", first.provider, first.seq)
    await store.peers.revoke_peer(first.provider, int(time.time()), status="suspended")
