"""The version every write carries, ordered by commit: the one place that argues why later commits always win.

Every write to a mirror or an index carries a version (ClickHouse `ReplacingMergeTree(version, ...)`, Elasticsearch
`version_type=external_gte`), and the store keeps the highest. Versions must follow PostgreSQL's *commit* order,
not the LSN of each change: a transaction open while a snapshot is taken has change LSNs below the snapshot's
position but commits after it, and its changes must win over the snapshot's rows.

**Streamed changes.** Debezium's PostgreSQL events carry `source.lsn`, the change's own LSN, and
`source.sequence = [lastCommitLsn, lsn]`, where `lastCommitLsn` is the end of the commit record of the transaction
streamed *before* this one (logical decoding emits whole transactions in commit order). A change's version is

    V(e) = max(lastCommitLsn(e), lsn(e))

Ordering: let T1 commit before T2, both streamed. Every change of T1 and T1's own `lastCommitLsn` lie before the
end of T1's commit record, and T2's `lastCommitLsn` is at or after that end. So every version of T2 is above every
version of T1: versions follow commit order across transactions. Within one transaction, versions never decrease
with the change's LSN; changes of one row that share a version (several updates of a row in one transaction,
all before `lastCommitLsn`) arrive in order on one partition and the later one wins, because both stores keep the
last write among equal versions (`external_gte`; ReplacingMergeTree keeps the last inserted of equal versions),
and a batch keeps only the last change of a key (`latest_per_key`).

**Snapshots** (backfill, repair, the search documents' re-read of other tables). Before the snapshot, one
transaction reads the WAL insert position `x` and then writes the anchor, a row of the published `ops.heartbeat`
table, and commits; only then is the REPEATABLE READ snapshot taken. Its rows are versioned `x`.
- A transaction the snapshot cannot see commits after the anchor, so Debezium streams it after the anchor and its
  `lastCommitLsn` is at least the end of the anchor's commit, which is above `x`: all its versions beat the
  snapshot's rows. This holds for a transaction that was already open, whose change LSNs lie below `x`.
- A transaction that committed before `x` was read has all its versions below the end of its commit record,
  so at most `x`: the snapshot's rows, which include its effect, win or tie with an older state.
- A transaction that committed between `x` and the snapshot is visible, but may version above `x`: its (older)
  change may briefly overwrite the snapshot's row, and every later change of that row follows in the stream. The
  stores converge; versioning low is always safe, versioning high never is.
No snapshot waits for open transactions, so an `idle in transaction` session cannot stall one.

Debezium's own snapshot rows (`op = r`) are versioned one below the snapshot's position, so below every change
committed after it. An initial snapshot gives that position as `source.lsn` (the slot's consistent point, which
waited for open transactions). An incremental snapshot (a signal in `ops.debezium_signal`) has no `source.lsn`:
its rows are emitted at the close of their chunk's window, at the position in `sequence`, the end of the
window's closing commit. A change committed after that commit streams after it, so its `lastCommitLsn` is at
least that position; one committed inside the window drops the row from the chunk (Debezium's own DBLog rule).

Limits: a version is a 63-bit integer (Elasticsearch's `long`), so LSNs up to 2**63 (8 EiB of WAL). After a
restore into a new cluster LSNs start lower, and every write is refused as stale until the stores are rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
import pyarrow as pa
import pyarrow.compute as pc

# The row the anchor writes: Debezium's own heartbeat row, so the anchor looks like one more heartbeat.
ANCHOR_SQL = "INSERT INTO ops.heartbeat (id, ts) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts"
MAX_VERSION = 2**63 - 1


def _sequence(sequence: Any) -> tuple[int | None, int | None]:
    """(lastCommitLsn, lsn) from Debezium's `source.sequence`, a JSON array of two LSN strings either of which
    may be null; a part that is absent or not a positive integer is None."""
    if not isinstance(sequence, str):
        return None, None
    if sequence.startswith('["') and sequence.endswith('"]') and sequence.isascii():
        # Debezium's usual spelling, '["123","456"]', read without a JSON parser.
        first, comma, second = sequence[2:-2].partition('","')
        if comma and first.isdigit() and second.isdigit():
            last_commit, lsn = int(first), int(second)
            if 0 < last_commit <= MAX_VERSION and 0 < lsn <= MAX_VERSION:
                return last_commit, lsn
    try:
        parsed = orjson.loads(sequence)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(parsed, list) or len(parsed) != 2:
        return None, None

    def position(part: Any) -> int | None:
        if isinstance(part, bool) or not isinstance(part, str | int):
            return None
        try:
            value = int(part)
        except ValueError:
            return None
        return value if 0 < value <= MAX_VERSION else None

    return position(parsed[0]), position(parsed[1])


def last_commit_lsn(sequence: Any) -> int | None:
    """`lastCommitLsn` from Debezium's `source.sequence`; None when absent or not in shape."""
    return _sequence(sequence)[0]


def sequence_position(sequence: Any) -> int | None:
    """The highest position `source.sequence` names: where an incremental snapshot's row was emitted."""
    parts = [p for p in _sequence(sequence) if p is not None]
    return max(parts) if parts else None


def stream_version(op: str, lsn: int, sequence: Any) -> int:
    """The version of a streamed change (see the module's argument). A snapshot read (`r`) versions one below the
    snapshot's position; an event without a usable `sequence` falls back to its own LSN."""
    if op == "r":
        return max(lsn - 1, 1)
    last_commit = last_commit_lsn(sequence)
    return lsn if last_commit is None else max(last_commit, lsn)


# Debezium's usual `sequence` (lastCommitLsn may be null), its lastCommitLsn captured; 18 digits at most, so it is
# within MAX_VERSION.
_USUAL_SEQUENCE = r'^\[(?:null|"(?P<last_commit>[0-9]{1,18})"),"[0-9]{1,18}"\]$'


def stream_versions(ops: Sequence[str], lsns: Sequence[int], sequences: Sequence[Any]) -> list[int]:
    """`stream_version` of each change of a batch, computed over the batch as columns (Arrow): the hot path of a sink
    that reads a batch as columns. A change of another kind (a snapshot read, a sequence in another spelling) is
    given its version one by one."""
    try:
        lsn = pa.array(lsns, pa.int64())
        sequence = pa.array(sequences, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # beyond 64 bits, or not text: one by one
        return [stream_version(*change) for change in zip(ops, lsns, sequences, strict=True)]
    return stream_versions_of(ops, lsn, sequence)


def stream_versions_of(ops: Sequence[str], lsn: pa.Array, sequence: pa.Array) -> list[int]:
    """`stream_versions` of a batch whose LSNs (int64) and sequences (strings) are Arrow arrays already."""
    if not ops:
        return []
    usual = pc.extract_regex(sequence, _USUAL_SEQUENCE)
    captured = pc.struct_field(usual, [0])  # "" where lastCommitLsn is null
    last_commit = pc.if_else(pc.equal(captured, ""), None, captured).cast(pa.int64())
    versions = pc.max_element_wise(lsn, last_commit, skip_nulls=True).to_pylist()
    odd = pc.and_(pc.is_null(usual), pc.is_valid(sequence))
    if "r" in ops:
        odd = pc.or_(odd, pc.equal(pa.array(list(ops), pa.string()), "r"))
    if pc.any(odd).as_py():
        for i in pc.indices_nonzero(odd).to_pylist():
            versions[i] = stream_version(ops[i], lsn[i].as_py(), sequence[i].as_py())
    return versions


def anchor_position(conn: psycopg.Connection) -> int:
    """Commit the anchor on `conn` (autocommit off, no transaction open) and return the version a snapshot taken
    after it may give its rows."""
    with conn.transaction():
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
        conn.execute(ANCHOR_SQL)
    assert row is not None
    return int(row[0])
