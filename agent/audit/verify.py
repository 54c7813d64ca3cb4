"""`fund-agent verify`: recompute the hash chain and check the ledger's invariants; and the ledger against the
broker's statement (both directions).

Problems are `table id N: what is wrong` lines. The chain pass streams each table in id order beside its links
(no row is held in memory beyond one batch), so a ledger of millions of rows verifies in one pass per table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, exists, func, inspect, or_, select, text
from sqlalchemy.orm import Session, aliased

from agent import money
from agent.audit import chain as chainmod
from agent.ledger import journal
from agent.ledger.models import (
    AuditChainEntry,
    AuditCheckpoint,
    AuditHead,
    DecisionRow,
    Transfer,
    TransferEvent,
)

# The transfer aggregate's transitions (agent/engine/transfers.py ALLOWED), repeated here so that the auditor's
# check does not import the engine: a change there must be a deliberate change here.
ALLOWED = {
    "pending": {"sent", "failed"},
    "sent": {"confirmed", "failed", "unknown"},
    "unknown": {"confirmed", "failed"},
}
PAGE = 10_000


# The order problems are reported in, so that the first line names the row that was edited: rows and links (by the
# seq of the link concerned; a transfer's whole-row check by its intent's link, before its events', whose
# encoding reads its broker_txn_id), then each transfer's fold, then the sums over many rows.
ROWS, FOLDS, SUMS = 0, 1, 2


@dataclass(frozen=True)
class Problem:
    order: tuple[int, int, int]  # (ROWS/FOLDS/SUMS; seq of the link it concerns, or NO_LINK; row id)
    table: str
    row_id: int
    what: str

    def __str__(self) -> str:
        return f"{self.table} id {self.row_id}: {self.what}"


@dataclass
class Result:
    rows: int
    head: str
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


NO_LINK = 2**62


def _pages(conn: Connection, query: Any, key: Any) -> Iterator[Sequence[Any]]:
    """Pages of `query`'s rows in `key` order (keyset): memory stays flat on big ledgers."""
    last = None
    while True:
        page_query = query if last is None else query.where(key > last)
        rows = conn.execute(page_query.limit(PAGE)).all()
        if rows:
            yield rows
        if len(rows) < PAGE:
            return
        last = rows[-1][0]


def _paged(conn: Connection, query: Any, key: Any) -> Iterator[Any]:
    """Rows of `query` in `key` order, fetched a page at a time."""
    for rows in _pages(conn, query, key):
        yield from rows


def _links(conn: Connection, kind: chainmod.Kind) -> Iterator[Any]:
    query = (select(AuditChainEntry.row_id, AuditChainEntry.seq, AuditChainEntry.chain, AuditChainEntry.content_hash)
             .where(AuditChainEntry.source == kind.source, AuditChainEntry.action == kind.action)
             .order_by(AuditChainEntry.row_id))
    return _paged(conn, query, AuditChainEntry.row_id)


def check_contents(conn: Connection, journal_base: int) -> list[Problem]:
    """Every chained row still encodes to its link's content hash, has a link, and every link has its row."""
    problems: list[Problem] = []
    for kind in chainmod.KINDS:
        if kind is chainmod.STATE:
            continue  # a transfer's whole row is compared with its latest `state` link alone: check_states
        rows = _paged(conn, chainmod.select_rows(kind, conn.dialect.name), chainmod.id_column(kind))
        links = _links(conn, kind)
        row = next(rows, None)
        entry = next(links, None)
        what = "cleared" if kind.action == "clear" else "row"
        while row is not None or entry is not None:
            if entry is None or (row is not None and row[0] < entry[0]):
                assert row is not None
                problems.append(Problem((ROWS, NO_LINK, row[0]), kind.source, row[0],
                                        f"{'clearing ' if kind.action == 'clear' else ''}not in the hash chain "
                                        "(written behind the agent's back)"))
                row = next(rows, None)
            elif row is None or entry[0] < row[0]:
                seq = int(entry[1])
                if not (kind.source == "decisions" and entry[2] == "journal" and seq <= journal_base):
                    problems.append(Problem((ROWS, seq, entry[0]), kind.source, entry[0],
                                            f"{what} chained at seq {seq} is missing (deleted)"))
                entry = next(links, None)
            else:
                chain, content = chainmod.encode_row(kind, row)
                if content != entry[3] or chain != entry[2]:
                    problems.append(Problem((ROWS, int(entry[1]), row[0]), kind.source, row[0],
                                            f"{what} differs from what was chained at seq {entry[1]} (edited)"))
                row = next(rows, None)
                entry = next(links, None)
    return problems


def check_states(conn: Connection, required: bool = True) -> list[Problem]:
    """Every transfer's row, all its columns, is what its latest `state` link chained (the row as its latest event
    left it): a mutable column (state, broker_txn_id, error fields, sent_at, updated_at, resolved_by, owner)
    changed behind the agent's back is named here. `required`: every chained transfer has a `state` link (a
    ledger at revision 0006 or later; before it, only those with one are compared)."""
    problems: list[Problem] = []
    state, create = chainmod.STATE, chainmod.BY_NAME[("transfers", "create")]
    # the newest state link whose event was deleted: a transfer whose latest surviving state link is older may
    # differ because of that deletion (named by check_contents), so it is named after it, not before
    deleted = conn.execute(select(func.max(AuditChainEntry.row_id)).where(
        AuditChainEntry.source == state.source, AuditChainEntry.action == state.action,
        ~exists().where(TransferEvent.id == AuditChainEntry.row_id))).scalar()
    query = select(*chainmod.state_columns(conn.dialect.name)).order_by(Transfer.id)
    for rows in _pages(conn, query, Transfer.id):
        low, high = rows[0][0], rows[-1][0]
        latest: dict[int, tuple[int, int, str]] = {}  # transfer id -> (event id, seq, content hash)
        for transfer_id, event_id, seq, content in conn.execute(
                select(TransferEvent.transfer_id, AuditChainEntry.row_id, AuditChainEntry.seq,
                       AuditChainEntry.content_hash)
                .join(TransferEvent, TransferEvent.id == AuditChainEntry.row_id)
                .where(AuditChainEntry.source == state.source, AuditChainEntry.action == state.action,
                       TransferEvent.transfer_id.between(low, high))):
            if transfer_id not in latest or event_id > latest[transfer_id][0]:
                latest[transfer_id] = (int(event_id), int(seq), content)
        created = {int(r[0]): int(r[1]) for r in conn.execute(
            select(AuditChainEntry.row_id, AuditChainEntry.seq)
            .where(AuditChainEntry.source == create.source, AuditChainEntry.action == create.action,
                   AuditChainEntry.row_id.between(low, high)))}
        for row in rows:
            transfer_id = int(row[0])
            found = latest.get(transfer_id)
            if found is None:
                if required and transfer_id in created:  # one with no intent link: named by check_contents
                    problems.append(Problem((ROWS, NO_LINK, transfer_id), "transfers", transfer_id,
                                            "its state is not in the hash chain (no state link for its events)"))
                continue
            event_id, seq, content = found
            if chainmod.encode_state(event_id, row) != content:
                order = NO_LINK if deleted is not None and deleted > event_id else created.get(transfer_id, seq)
                problems.append(Problem((ROWS, order, transfer_id), "transfers",
                                        transfer_id, f"row differs from its state chained at seq {seq} after "
                                        f"transfer_events id {event_id} (edited)"))
    return problems


def check_links(conn: Connection) -> tuple[int, dict[str, str], int, list[Problem]]:
    """Walk the links in seq order: each follows its chain's previous link and hashes right. Returns (links,
    heads, journal base seq, problems)."""
    problems: list[Problem] = []
    checkpoint = conn.execute(select(AuditCheckpoint.journal_seq, AuditCheckpoint.journal_hash)
                              .order_by(AuditCheckpoint.id.desc()).limit(1)).first()
    base_seq, base_hash = (int(checkpoint[0]), checkpoint[1]) if checkpoint else (0, chainmod.GENESIS)
    heads = {"ledger": chainmod.GENESIS, "journal": base_hash}
    last_seq = {"ledger": 0, "journal": base_seq}
    gaps: list[tuple[int, int]] = []  # (first, last) seq of each run of missing seqs, in order
    count = previous = 0
    query = select(AuditChainEntry.seq, AuditChainEntry.chain, AuditChainEntry.content_hash,
                   AuditChainEntry.prev_hash, AuditChainEntry.hash).order_by(AuditChainEntry.seq)
    for seq, chain, content, prev, digest in _paged(conn, query, AuditChainEntry.seq):
        seq = int(seq)
        count += 1
        if seq - 1 > max(previous, base_seq):  # missing seqs (not those of the pruned journal range)
            gaps.append((max(previous, base_seq) + 1, seq - 1))
        previous = seq
        if chain not in heads:
            problems.append(Problem((ROWS, seq, seq), "audit_chain", seq, f"unknown chain {chain!r}"))
            continue
        if chain == "journal" and seq <= base_seq:
            problems.append(Problem((ROWS, seq, seq), "audit_chain", seq,
                                    "a journal link before the prune checkpoint"))
            continue
        if prev != heads[chain]:
            problems.append(Problem((ROWS, seq, seq), "audit_chain", seq,
                                    f"does not follow the previous {chain} link (a link was removed or inserted)"))
        if chainmod.link(seq, prev, content) != digest:
            problems.append(Problem((ROWS, seq, seq), "audit_chain", seq,
                                    "its hash does not match its content (edited)"))
        heads[chain] = digest
        last_seq[chain] = seq
    stored = {r[0]: (int(r[1]), r[2]) for r in conn.execute(select(AuditHead.chain, AuditHead.seq, AuditHead.hash))}
    for chain, digest in heads.items():
        head_seq, head_hash = stored.get(chain, (0, None))
        if head_hash == digest:
            continue
        end = last_seq[chain]
        if count == 0:  # every link gone: name the first row that lost its link
            problems.append(first_unlinked(conn, f"the audit_chain table was emptied (its {chain} head, "
                                                 f"audit_head, was written at seq {head_seq})"))
            break
        if head_seq > end:  # links removed at the end: name the first seq missing after this chain's last link
            missing = next((max(first, end + 1) for first, last in gaps if last > end), max(end, previous) + 1)
            problems.append(Problem((ROWS, missing, missing), "audit_chain", missing,
                                    f"missing: the {chain} chain ends at seq {end}, but its head (audit_head) was "
                                    f"written at seq {head_seq} (links removed at the end)"))
        elif end:
            problems.append(Problem((ROWS, NO_LINK, end), "audit_chain", end,
                                    f"the last {chain} link, but the {chain} head (audit_head) does not match it "
                                    "(the head was edited)"))
        else:
            problems.append(Problem((ROWS, NO_LINK, 0), "audit_chain", 0,
                                    f"the {chain} chain has no link, but its head (audit_head) names one (edited)"))
    return count, heads, base_seq, problems


def check_invariants(conn: Connection) -> list[Problem]:
    problems: list[Problem] = []
    # every transfer's state is the fold of its events: pending first, allowed steps, the last one is the state
    transfers = _paged(conn, select(Transfer.id, Transfer.state).order_by(Transfer.id), Transfer.id)
    events = _paged(conn, select(TransferEvent.id, TransferEvent.transfer_id, TransferEvent.state)
                    .order_by(TransferEvent.id), TransferEvent.id)
    folds: dict[int, str | None] = {}
    for _, transfer_id, state in events:
        before = folds.get(transfer_id)
        if before is None and transfer_id in folds:
            continue  # already broken: reported once
        if (before is None and state != "pending") or (before is not None and state not in ALLOWED.get(before, ())):
            problems.append(Problem((FOLDS, NO_LINK, transfer_id), "transfers", transfer_id,
                                    f"its events go {before or 'nowhere'} -> {state}, which is not allowed"))
            folds[transfer_id] = None
            continue
        folds[transfer_id] = state
    for transfer_id, state in transfers:
        if transfer_id not in folds:
            problems.append(Problem((FOLDS, NO_LINK, transfer_id), "transfers", transfer_id, "has no events"))
        elif folds[transfer_id] is not None and folds[transfer_id] != state:
            problems.append(Problem((FOLDS, NO_LINK, transfer_id), "transfers", transfer_id,
                                    f"state {state} is not the fold of its events ({folds[transfer_id]})"))
    # no broker transaction linked twice (the UNIQUE constraint says so; a rebuilt table may not)
    for txn, ids in conn.execute(select(Transfer.broker_txn_id, func.min(Transfer.id))
                                 .where(Transfer.broker_txn_id.is_not(None)).group_by(Transfer.broker_txn_id)
                                 .having(func.count(Transfer.id) > 1)):
        problems.append(Problem((FOLDS, NO_LINK, int(ids)), "transfers", int(ids), f"broker txn {txn} is linked twice"))
    # sums per account: confirmed transfers against transfers with a confirmed event
    by_state = {tuple(r[:3]): int(r[3]) for r in conn.execute(
        select(Transfer.account, Transfer.kind, Transfer.currency, func.sum(Transfer.amount_minor))
        .where(Transfer.state == "confirmed").group_by(Transfer.account, Transfer.kind, Transfer.currency))}
    confirmed_ids = select(TransferEvent.transfer_id).where(TransferEvent.state == "confirmed")
    by_event = {tuple(r[:3]): int(r[3]) for r in conn.execute(
        select(Transfer.account, Transfer.kind, Transfer.currency, func.sum(Transfer.amount_minor))
        .where(Transfer.id.in_(confirmed_ids)).group_by(Transfer.account, Transfer.kind, Transfer.currency))}
    for key in sorted(set(by_state) | set(by_event)):
        a, b = by_state.get(key, 0), by_event.get(key, 0)
        if a != b:
            account, kind, currency = key
            # name a transfer of the group whose state and events disagree about its confirmation
            group = and_(Transfer.account == account, Transfer.kind == kind, Transfer.currency == currency)
            culprit = or_(and_(Transfer.state == "confirmed", Transfer.id.not_in(confirmed_ids)),
                          and_(Transfer.state != "confirmed", Transfer.id.in_(confirmed_ids)))
            first = (conn.execute(select(func.min(Transfer.id)).where(group, culprit)).scalar_one()
                     or conn.execute(select(func.min(Transfer.id)).where(group)).scalar_one())
            problems.append(Problem((SUMS, NO_LINK, int(first or 0)), "transfers", int(first or 0),
                                    f"confirmed {kind} of {account} sum to {_fmt(a, currency)} {currency}, but "
                                    f"their confirmed events to {_fmt(b, currency)}"))
    problems.extend(check_open_runs(conn))
    return problems


def check_open_runs(conn: Connection) -> list[Problem]:
    """Runs of evaluations (agent/ledger/journal.py): every row's run is well formed (a count of at least 1 that
    its entries give, entries that decode, equities that are numbers), and only an account's newest row may be a
    run not ended yet (an ended one is compared with its `run` link by check_contents)."""
    problems: list[Problem] = []
    if "run_count" not in {c["name"] for c in inspect(conn).get_columns("decisions")}:
        return problems  # a ledger before revision 0007 has no runs
    newer = aliased(DecisionRow)
    runs = (select(DecisionRow.id, DecisionRow.at, DecisionRow.equity_age_s, DecisionRow.run_count,
                   DecisionRow.run_last_at, DecisionRow.run_evals, DecisionRow.run_sealed,
                   exists().where(newer.account == DecisionRow.account, newer.id > DecisionRow.id))
            .where(or_(DecisionRow.run_count != 1, DecisionRow.run_evals.is_not(None),
                       DecisionRow.run_last_at.is_not(None)))
            .order_by(DecisionRow.id))
    for row_id, first_at, age, count, last_at, entries, sealed, superseded in _paged(conn, runs, DecisionRow.id):
        where = Problem((ROWS, NO_LINK, int(row_id)), "decisions", int(row_id), "")
        wrong = journal.run_problem(first_at, age is not None, int(count), last_at, entries)
        if wrong is not None:
            problems.append(replace(where, what=f"{wrong} (edited)"))
        elif superseded and count > 1 and not sealed:
            problems.append(replace(where, what="a run that ended is not in the hash chain (edited)"))
    return problems


def _fmt(minor: int, currency: str) -> str:
    try:
        return money.fmt(money.from_minor(minor, currency), currency)
    except money.MoneyError:
        return f"{minor} minor units"


def head_of(heads: dict[str, str]) -> str:
    """The one hash an auditor notes: both chains' heads, hashed together."""
    return chainmod.link(0, heads["ledger"], heads["journal"])


CHAIN_TABLES = ("audit_chain", "audit_head", "audit_checkpoints")


def missing_tables(conn: Connection) -> list[str]:
    inspector = inspect(conn)
    return [table for table in CHAIN_TABLES if not inspector.has_table(table)]


def revision_of(conn: Connection) -> int | None:
    """The ledger's schema revision as a number (None: none recorded; a large one: not a number)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if revision is None:
        return None
    return int(revision) if str(revision).isdigit() else NO_LINK


def chain_expected(conn: Connection) -> bool:
    """The ledger's schema revision (0004 or later) says it has a hash chain: without one, it was removed."""
    revision = revision_of(conn)
    return revision is not None and revision >= 4


def chain_dropped(conn: Connection, missing: Sequence[str]) -> Problem:
    """The problem to name when chain tables are gone from a ledger that had them: the first row that lost its
    link, or the chain's last link when only its head or checkpoints went."""
    what = f"the {' and '.join(missing)} table{'s are' if len(missing) > 1 else ' is'} missing (dropped)"
    if "audit_chain" not in missing:
        last = conn.execute(select(func.max(AuditChainEntry.seq))).scalar()
        return Problem((ROWS, 0, 0), "audit_chain", int(last or 0), f"{what}: this chain cannot be checked")
    return first_unlinked(conn, what)


def first_unlinked(conn: Connection, what: str) -> Problem:
    """The whole chain is gone: name the first money row (in the chain's table order) that lost its link."""
    for kind in chainmod.KINDS:
        if kind.action in ("create", "append"):
            first = conn.execute(select(func.min(chainmod.id_column(kind)))).scalar()
            if first is not None:
                return Problem((ROWS, 0, int(first)), kind.source, int(first),
                               f"not in the hash chain: {what}, behind the agent's back")
    return Problem((ROWS, 0, 0), "audit_chain", 0, f"{what}, behind the agent's back")


def verify(conn: Connection) -> Result:
    missing = missing_tables(conn)
    if missing:
        return Result(rows=0, head=head_of({c: chainmod.GENESIS for c in chainmod.CHAINS}),
                      problems=[chain_dropped(conn, missing)])
    count, heads, base, problems = check_links(conn)
    problems += check_contents(conn, base)
    problems += check_states(conn, required=(revision_of(conn) or 0) >= 6)
    problems += check_invariants(conn)
    problems.sort(key=lambda p: p.order)
    return Result(rows=count, head=head_of(heads), problems=problems)


# ---- the ledger against the broker ----

def unlinked_statement_rows(session: Session, statement_rows: Sequence[dict[str, Any]], app_id: int,
                            include_unattributed: bool = False) -> list[dict[str, Any]]:
    """Transfer rows of a broker statement made by our app_id that no ledger transfer links (money moved that the
    ledger does not know). With `include_unattributed`, rows that record no app_id count too (Deriv leaves it
    null on some rows). Row order is kept."""
    ours = [r for r in statement_rows if r.get("action_type", "transfer") == "transfer"
            and isinstance(r.get("transaction_id"), int)
            and (r.get("app_id") == app_id or (include_unattributed and r.get("app_id") is None))]
    linked: set[int] = set()
    ids = sorted({int(r["transaction_id"]) for r in ours})
    for start in range(0, len(ids), chainmod.BATCH):
        linked.update(session.scalars(select(Transfer.broker_txn_id)
                                      .where(Transfer.broker_txn_id.in_(ids[start:start + chainmod.BATCH]))))
    return [r for r in ours if r["transaction_id"] not in linked]


def missing_at_broker(confirmed: Sequence[Transfer], statement_rows: Sequence[dict[str, Any]], app_id: int
                      ) -> list[tuple[Transfer, str]]:
    """Confirmed transfers that the statement does not show as they are recorded: (transfer, why)."""
    from agent.engine.reconcile import matches

    by_txn = {r.get("transaction_id"): r for r in statement_rows}
    missing = []
    for t in confirmed:
        row = by_txn.get(t.broker_txn_id)
        if row is None:
            missing.append((t, f"txn {t.broker_txn_id} is not in {t.funding}'s statement"))
        elif not matches({**row, "app_id": row.get("app_id") if row.get("app_id") == app_id else None}, t, app_id):
            amount = row.get("amount")
            missing.append((t, f"txn {t.broker_txn_id} at the broker is another transfer (amount {amount}, "
                               f"{(row.get('from') or {}).get('loginid')} -> {(row.get('to') or {}).get('loginid')})"))
    return missing


def signed(row: dict[str, Any], currency: str | None = None) -> str:
    """A statement row's signed amount as a decimal string, with the currency's places when known."""
    amount = row.get("amount")
    if not isinstance(amount, (Decimal, int)):
        return str(amount)
    if currency is not None:
        try:
            return money.fmt(Decimal(amount), currency)
        except money.MoneyError:
            pass
    return format(Decimal(amount), "f")
