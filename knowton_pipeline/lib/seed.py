"""Deterministic KnowTon demo data (users, contents, purchases), loaded into PostgreSQL with COPY.

Row generation is pure (a seeded `random.Random` in, plain tuples out) so it is tested without a database.
"""

from __future__ import annotations

import base64
import json
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

import psycopg
from psycopg import sql
from tqdm import tqdm

# Every timestamp is an offset back from this instant, never from the wall clock, so the same seed gives
# the same rows on every run and machine.
REFERENCE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
_YEAR_US = 365 * 24 * 3600 * 1_000_000
_ONE_US = timedelta(microseconds=1)

# Children before parents, so TRUNCATE and the emptiness check read in FK order.
SEED_TABLES = ("Purchase", "Content", "User")

USER_COLUMNS = (
    "address", "username", "email", "bio", "avatarUrl", "reputation", "isVerified", "createdAt", "updatedAt",
)  # fmt: skip
CONTENT_COLUMNS = (
    "id", "creator", "title", "description", "category", "tags", "price", "status", "metadata",
    "createdAt", "updatedAt",
)  # fmt: skip
PURCHASE_COLUMNS = (
    "id", "contentId", "buyer", "amount", "currency", "txHash", "status", "createdAt", "updatedAt",
)  # fmt: skip


class UserRow(NamedTuple):
    """A `"User"` row, fields in `USER_COLUMNS` order."""

    address: str
    username: str
    email: str | None
    bio: str | None
    avatar_url: str | None
    reputation: int
    is_verified: bool
    created_at: datetime
    updated_at: datetime


class ContentRow(NamedTuple):
    """A `"Content"` row, fields in `CONTENT_COLUMNS` order. `metadata` is JSON text."""

    id: int
    creator: str
    title: str
    description: str | None
    category: str
    tags: list[str]
    price: Decimal
    status: str
    metadata: str
    created_at: datetime
    updated_at: datetime


class PurchaseRow(NamedTuple):
    """A `"Purchase"` row, fields in `PURCHASE_COLUMNS` order."""

    id: int
    content_id: int
    buyer: str
    amount: Decimal
    currency: str
    tx_hash: str | None
    status: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SeedSize:
    """How many rows of each table to generate."""

    users: int = 10_000
    contents: int = 20_000
    purchases: int = 100_000

    def __post_init__(self) -> None:
        if min(self.users, self.contents, self.purchases) < 0:
            raise ValueError(f"row counts cannot be negative: {self}")
        if self.contents and not self.users:
            raise ValueError("contents need at least one user to be their creator")
        if self.purchases and not (self.users and self.contents):
            raise ValueError("purchases need at least one user and one content")

    @property
    def total(self) -> int:
        return self.users + self.contents + self.purchases


@dataclass(frozen=True)
class SeedReport:
    """What `seed_demo_data` loaded and how long it took (generation, COPY and commit)."""

    users: int
    contents: int
    purchases: int
    seconds: float


@dataclass(frozen=True)
class DemoRows:
    """The three tables' rows, parents before children."""

    users: tuple[UserRow, ...]
    contents: tuple[ContentRow, ...]
    purchases: tuple[PurchaseRow, ...]


class SeedError(Exception):
    """Seeding would mix demo rows with existing data."""


# Word pools are built once: per-row work is only random picks and string joins, which keeps 130k
# rows at a few seconds. The non-ASCII entries are deliberate: they exercise UTF-8 handling and the
# canonical hashing downstream (accents, Cyrillic, CJK, emoji, quotes, a newline, a backslash).
_FIRST_NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
    "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yara", "zoe", "amir", "bea", "chen",
    "dmitri", "emeka", "fatima", "goran", "hana", "ines", "jun", "kofi", "lena", "mateo", "noor", "oskar",
    "priya", "quinn", "rosa", "sven", "tariq", "uma", "wei", "ximena", "yuki", "zara",
    "zoë", "josé", "françois", "björn", "señora", "mária",
)  # fmt: skip
_HANDLE_WORDS = (
    "builder", "dao", "degen", "whale", "hodl", "miner", "node", "block", "chain", "ledger", "token", "wallet",
    "maker", "scribe", "artist", "coder", "writer", "teacher", "curator", "collector", "studio", "labs", "beats",
    "pixels", "notes", "press", "academy", "verse", "punk", "ape", "moon", "sats", "gas", "layer2", "zk",
)  # fmt: skip
_EMAIL_DOMAINS = ("gmail.com", "proton.me", "outlook.com", "knowton.io", "yahoo.co.jp", "fastmail.com")
_BIO_SENTENCES = (
    "Building on Ethereum since 2017.",
    "I write about DeFi, DAOs and everything in between.",
    "Music producer sharing stems and sample packs.",
    "Full-stack developer, Solidity auditor in my spare time.",
    "Teaching blockchain basics to beginners.",
    "Digital artist. Generative art and pixel worlds.",
    "Coffee, code, and cryptography.",
    "Ex-banker, now exploring tokenized knowledge.",
    "Opinions are my own. Not financial advice.",
    "Researcher in zero-knowledge proofs.",
    "Photographer travelling with a camera and a cold wallet.",
    "Café au lait enthusiast, Montréal-based créatrice.",
    "Разработчик смарт-контрактов из Москвы.",
    "東京在住のブロックチェーン研究者です。",
    "区块链开发者\uff0c热爱开源。",
    "🚀 To the moon, one lesson at a time 🌙",
    'Say "gm" to me on-chain ✨',
    "Two lines:\nfirst one, then this.",
    "Keeps notes in C:\\knowton\\drafts.",
)
_CATEGORIES = (
    "education", "music", "art", "video", "ebook", "podcast", "software", "research", "photography", "gaming",
)  # fmt: skip
_TAGS = (
    "defi", "nft", "dao", "solidity", "ethereum", "bitcoin", "layer2", "zk", "tutorial", "beginner", "advanced",
    "trading", "security", "audit", "web3", "design", "lofi", "hiphop", "ambient", "3d", "generative",
    "photography", "travel", "gamefi", "governance", "tokenomics", "rust", "python", "ai", "research",
    "éducation", "日本語", "中文", "крипто",
)  # fmt: skip
_TITLE_ADJECTIVES = (
    "Complete", "Practical", "Advanced", "Beginner's", "Hands-on", "Visual", "Definitive", "Quick", "Deep-Dive",
    "Essential", "Modern", "Hidden", "Ultimate", "Minimal",
)  # fmt: skip
_TITLE_TOPICS = (
    "Solidity Patterns", "DeFi Lending", "NFT Royalties", "DAO Governance", "Layer 2 Rollups",
    "Zero-Knowledge Proofs", "Token Design", "Smart Contract Security", "Lo-Fi Beats", "Ambient Soundscapes",
    "Generative Art", "Street Photography", "Indie Game Dev", "Rust for Blockchains", "On-chain Analytics",
    "Wallet UX", "MEV", "Stablecoins",
)  # fmt: skip
_TITLE_FORMATS = (
    "Guide", "Course", "Handbook", "Masterclass", "Workshop", "Sample Pack", "Collection", "Notes", "Toolkit",
    "Series", "Cheat Sheet", "Album",
)  # fmt: skip
_UNICODE_TITLES = (
    "Introducción a las finanzas descentralizadas",
    "Введение в DeFi",
    "区块链入门指南",
    "ブロックチェーン基礎講座",
    "Café ☕ & Crypto: morning notes",
    "🚀 Launch your first token 🪙",
    "Naïve Bayes for on-chain fraud — Übersicht",
    "\u201cThe Merge\u201d explained",
)
_DESCRIPTION_SENTENCES = (
    "Learn the fundamentals step by step with real examples.",
    "Includes source code, exercises and a final project.",
    "Recorded live and edited for clarity.",
    "Updated for the latest protocol upgrades.",
    "Perfect for developers moving from Web2.",
    "All stems are royalty-free for KnowTon holders.",
    "High-resolution files, ready to print.",
    "Covers common pitfalls and how to avoid them.",
    "Comes with lifetime updates.",
    "Contenu disponible en français et en anglais.",
    "日本語の字幕付き。",
    "Rated 5⭐ by early readers.",
)
_LICENSES = ("CC-BY-4.0", "CC-BY-NC-4.0", "MIT", "All rights reserved", "CC0-1.0")
_LANGUAGES = ("en", "en", "en", "es", "fr", "de", "ja", "zh", "ru", "pt")
_PLATFORMS = ("linux", "macos", "windows", "web")

# Weighted picks are precomputed as (values, cumulative weights) for `rng.choices`.
_CONTENT_STATUS = (("published", "draft", "archived"), (70, 90, 100))
_PURCHASE_STATUS = (("completed", "pending", "refunded", "failed"), (85, 91, 95, 100))
_CURRENCIES = (("USDC", "ETH", "KNOW"), (50, 80, 100))


def _pick(rng: random.Random, weighted: tuple[tuple[str, ...], tuple[int, ...]]) -> str:
    values, cum_weights = weighted
    return rng.choices(values, cum_weights=cum_weights)[0]


def _ts(age_us: int) -> datetime:
    """The instant `age_us` microseconds before `REFERENCE_TIME`."""
    return REFERENCE_TIME - timedelta(microseconds=age_us)


def _age_us(ts: datetime) -> int:
    return (REFERENCE_TIME - ts) // _ONE_US


def _sentences(rng: random.Random, pool: Sequence[str], low: int, high: int) -> str:
    return " ".join(rng.sample(pool, rng.randint(low, high)))


def _unique_username(rng: random.Random, taken: set[str]) -> str:
    first = rng.choice(_FIRST_NAMES)
    shape = rng.random()
    if shape < 0.45:
        candidate = f"{first}_{rng.choice(_HANDLE_WORDS)}"
    elif shape < 0.75:
        candidate = f"{first}{rng.randrange(10, 10_000)}"
    else:
        candidate = f"{rng.choice(_HANDLE_WORDS)}.{first}"
    # Collisions are common with small pools; a numeric suffix resolves them while staying realistic.
    while candidate in taken:
        candidate = f"{candidate}_{rng.randrange(100_000)}"
    taken.add(candidate)
    return candidate


def generate_users(rng: random.Random, n: int) -> list[UserRow]:
    """`n` users with unique lowercase 0x-addresses and unique usernames."""
    users: list[UserRow] = []
    addresses: set[str] = set()
    usernames: set[str] = set()
    for i in range(n):
        address = f"0x{rng.getrandbits(160):040x}"
        while address in addresses:
            address = f"0x{rng.getrandbits(160):040x}"
        addresses.add(address)
        username = _unique_username(rng, usernames)

        email = None
        if rng.random() >= 0.15:
            local = username.lower() if username.isascii() else f"user{i}"
            email = f"{local}@{rng.choice(_EMAIL_DOMAINS)}"

        roll = rng.random()
        bio = None if roll < 0.2 else "" if roll < 0.28 else _sentences(rng, _BIO_SENTENCES, 1, 3)

        avatar_roll = rng.random()
        avatar_url = (
            None
            if avatar_roll < 0.3
            else f"https://cdn.knowton.io/avatars/{address[2:14]}.png"
            if avatar_roll < 0.8
            else f"ipfs://bafybei{address[2:42]}/avatar.jpg"
        )

        # Heavy-tailed like real reputation: most users near zero, a few very high.
        reputation = 0 if rng.random() < 0.25 else min(int(rng.paretovariate(1.2) * 10), 1_000_000)
        is_verified = rng.random() < 0.12

        created_age = rng.randrange(_YEAR_US)
        updated_age = created_age if rng.random() < 0.55 else rng.randrange(created_age + 1)
        users.append(
            UserRow(
                address, username, email, bio, avatar_url, reputation, is_verified, _ts(created_age), _ts(updated_age)
            )
        )
    return users


def _price(rng: random.Random) -> Decimal:
    roll = rng.random()
    if roll < 0.1:
        cents = 0
    elif roll < 0.35:
        cents = rng.choice((1, 2, 5, 9, 10, 15, 20, 25, 49, 50, 99, 100)) * 100
    else:
        cents = rng.randrange(1, 50_000)
    # scaleb keeps the exponent at -2, so 5 is Decimal('5.00') exactly like numeric(12,2).
    return Decimal(cents).scaleb(-2)


def _metadata(rng: random.Random, category: str) -> str:
    meta: dict[str, object] = {"language": rng.choice(_LANGUAGES), "license": rng.choice(_LICENSES)}
    if category in ("video", "podcast", "music"):
        meta["duration_seconds"] = rng.randrange(30, 4 * 3600)
    elif category in ("ebook", "research", "education"):
        meta["pages"] = rng.randrange(4, 900)
        meta["format"] = rng.choice(("pdf", "epub", "html"))
    elif category in ("art", "photography"):
        meta["dimensions"] = {"width": rng.choice((1080, 2048, 3840, 4000)), "height": rng.choice((1080, 2160, 3000))}
        meta["format"] = rng.choice(("png", "jpg", "webp"))
    elif category == "software":
        meta["version"] = f"{rng.randrange(4)}.{rng.randrange(20)}.{rng.randrange(10)}"
        meta["platforms"] = rng.sample(_PLATFORMS, rng.randint(1, len(_PLATFORMS)))
    if rng.random() < 0.3:
        # One decimal only: it round-trips through JSON, jsonb and ClickHouse text unchanged.
        meta["rating"] = rng.randrange(10, 51) / 10
    if rng.random() < 0.5:
        meta["ipfs_cid"] = "bafybei" + base64.b32encode(rng.randbytes(30)).decode().lower()
    return json.dumps(meta, ensure_ascii=False)


def _title(rng: random.Random) -> str:
    if rng.random() < 0.06:
        return rng.choice(_UNICODE_TITLES)
    return f"The {rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_TOPICS)} {rng.choice(_TITLE_FORMATS)}"


def generate_contents(rng: random.Random, n: int, users: Sequence[UserRow]) -> list[ContentRow]:
    """`n` contents with ids 1..n, each created by one of `users` after that user joined."""
    if n and not users:
        raise ValueError("contents need at least one user to be their creator")
    # About a third of users publish, so some creators have many contents, as on a real platform.
    creators = users[: max(1, len(users) // 3)]
    contents: list[ContentRow] = []
    for content_id in range(1, n + 1):
        creator = rng.choice(creators)
        category = rng.choice(_CATEGORIES)
        roll = rng.random()
        description = None if roll < 0.12 else "" if roll < 0.15 else _sentences(rng, _DESCRIPTION_SENTENCES, 1, 4)
        tags = rng.sample(_TAGS, rng.randint(0, 4))
        created_age = rng.randrange(_age_us(creator.created_at) + 1)
        updated_age = created_age if rng.random() < 0.5 else rng.randrange(created_age + 1)
        contents.append(
            ContentRow(
                content_id,
                creator.address,
                _title(rng),
                description,
                category,
                tags,
                _price(rng),
                _pick(rng, _CONTENT_STATUS),
                _metadata(rng, category),
                _ts(created_age),
                _ts(updated_age),
            )
        )
    return contents


def _amount(rng: random.Random, currency: str, price: Decimal) -> Decimal:
    if currency == "USDC":
        return price.quantize(Decimal("0.000001"))
    if currency == "ETH":
        # Roughly the USD price at ~3000 USD/ETH, to 6 decimals as the column keeps them.
        return Decimal(int(price * 1_000_000 / 3000) + rng.randrange(100)).scaleb(-6)
    return Decimal(int(price * 10) * 1_000_000 + rng.randrange(1_000_000)).scaleb(-6)


def generate_purchases(
    rng: random.Random, n: int, contents: Sequence[ContentRow], users: Sequence[UserRow]
) -> list[PurchaseRow]:
    """`n` purchases with ids 1..n of `contents` by `users`, each made after its content was created."""
    if n and not (contents and users):
        raise ValueError("purchases need at least one user and one content")
    # Popularity is heavy-tailed and mostly on published contents; one `choices` call picks all of them.
    weights = [rng.paretovariate(1.5) * (1.0 if c.status == "published" else 0.05) for c in contents]
    picked = rng.choices(contents, weights=weights, k=n) if n else []
    tx_hashes: set[str] = set()
    purchases: list[PurchaseRow] = []
    for purchase_id, content in enumerate(picked, start=1):
        buyer = rng.choice(users).address
        currency = _pick(rng, _CURRENCIES)
        status = _pick(rng, _PURCHASE_STATUS)
        tx_hash = None
        # Pending and failed purchases often never reached the chain.
        if not (status == "pending" and rng.random() < 0.5) and not (status == "failed" and rng.random() < 0.3):
            tx_hash = f"0x{rng.getrandbits(256):064x}"
            while tx_hash in tx_hashes:
                tx_hash = f"0x{rng.getrandbits(256):064x}"
            tx_hashes.add(tx_hash)
        created_age = rng.randrange(_age_us(content.created_at) + 1)
        # Settled purchases were updated when their status changed; pending ones never were.
        updated_age = created_age if status == "pending" else max(0, created_age - rng.randrange(600_000_000))
        purchases.append(
            PurchaseRow(
                purchase_id,
                content.id,
                buyer,
                _amount(rng, currency, content.price),
                currency,
                tx_hash,
                status,
                _ts(created_age),
                _ts(updated_age),
            )
        )
    return purchases


def generate_demo_rows(size: SeedSize = SeedSize(), *, seed: int = 42) -> DemoRows:
    """All demo rows for `size`; the same `size` and `seed` always give identical rows."""
    rng = random.Random(seed)
    users = generate_users(rng, size.users)
    contents = generate_contents(rng, size.contents, users)
    purchases = generate_purchases(rng, size.purchases, contents, users)
    return DemoRows(tuple(users), tuple(contents), tuple(purchases))


def _row_counts(cur: psycopg.Cursor) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in SEED_TABLES:
        row = cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def _copy_rows(
    cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: Iterable[tuple[object, ...]], bar: tqdm
) -> None:
    # Text-format COPY with no set_types: psycopg dumps each value by its Python type, so JSON text reaches
    # jsonb unchanged (a jsonb dumper would JSON-encode the string a second time) and lists become
    # text[] literals, including the empty '{}'.
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    pending = 0
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            pending += 1
            if pending == 5_000:
                bar.update(pending)
                pending = 0
    bar.update(pending)


def seed_demo_data(
    conn: psycopg.Connection,
    size: SeedSize = SeedSize(),
    *,
    seed: int = 42,
    replace: bool = False,
    progress: bool = True,
) -> SeedReport:
    """Load deterministic demo rows into "User", "Content" and "Purchase" in one transaction.

    Refuses (SeedError) to add to tables that already have rows unless `replace`, which truncates them
    first. Identity sequences are moved past the explicit ids so later INSERTs without an id work.
    """
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        counts = _row_counts(cur)
        non_empty = {table: count for table, count in counts.items() if count}
        if non_empty and not replace:
            found = ", ".join(f'"{table}" has {count} rows' for table, count in non_empty.items())
            raise SeedError(
                f"refusing to seed into non-empty tables: {found}. Use --replace (replace=True) to truncate them first."
            )
        if replace:
            cur.execute('TRUNCATE "Purchase", "Content", "User"')
        # Generated only once the tables are known to take them (`seed --if-empty` runs on every demo start).
        rows = generate_demo_rows(size, seed=seed)
        with tqdm(
            total=size.total, desc="seeding", unit="rows", unit_scale=True, file=sys.stderr, disable=not progress
        ) as bar:
            _copy_rows(cur, "User", USER_COLUMNS, rows.users, bar)
            _copy_rows(cur, "Content", CONTENT_COLUMNS, rows.contents, bar)
            _copy_rows(cur, "Purchase", PURCHASE_COLUMNS, rows.purchases, bar)
        for table in ("Content", "Purchase"):
            # is_called = false makes the next generated id exactly max(id) + 1, also when the table is empty.
            cur.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({}, 'id'), coalesce(max(id), 0) + 1, false) FROM {}"
                ).format(sql.Literal(f'public."{table}"'), sql.Identifier(table))
            )
    return SeedReport(len(rows.users), len(rows.contents), len(rows.purchases), time.perf_counter() - started)
