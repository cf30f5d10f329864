from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from farebox.agent.book import MAX_ENTRIES, BookEntry, ReceiptBook
from farebox.errors import ConfigError, PaymentError

PAYER = "0x" + "ab" * 20
PAY_TO = "0x" + "cd" * 20
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


def entry(at: int, url: str = "https://api.example.com/weather", **changes: object) -> BookEntry:
    base = BookEntry(
        at=at,
        url=url,
        method="GET",
        status=200,
        network="eip155:84532",
        asset=USDC,
        amount=10_000,
        pay_to=PAY_TO,
        payer=PAYER,
        transaction="0x" + f"{at:064x}",
        receipt_jws=f"eyJ.{at}.sig",
        receipt_ref=f"jti:{at}",
        issuer="https://api.example.com",
        verified=True,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def book() -> ReceiptBook:
    return ReceiptBook(None)


def test_round_trip(book: ReceiptBook) -> None:
    written = entry(100)
    book.add(written)
    assert book.get("jti:100") == written
    assert book.entries() == [written]
    assert book.get("jti:nope") is None


def test_an_entry_without_a_receipt(book: ReceiptBook) -> None:
    bare = entry(1, receipt_jws=None, receipt_ref=None, issuer=None, verified=False)
    book.add(bare)
    book.add(dataclasses.replace(bare, at=2))  # many entries may lack a receipt reference
    assert book.entries() == [dataclasses.replace(bare, at=2), bare]


def test_big_amounts_are_exact(book: ReceiptBook) -> None:
    biggest = entry(1, amount=2**256 - 1)
    book.add(biggest)
    found = book.get("jti:1")
    assert found is not None
    assert found.amount == 2**256 - 1
    assert type(found.amount) is int


def test_filters_and_order(book: ReceiptBook) -> None:
    book.add(entry(30, "https://api.example.com/a"))
    book.add(entry(10, "https://other.example.org/b"))
    book.add(entry(20, "https://API.Example.com:8443/c"))
    book.add(entry(20, "https://api.example.com/d", receipt_ref="jti:20b"))  # same second
    book.add(entry(5, "http://[::1]:8080/local"))

    def urls(found: list[BookEntry]) -> list[str]:
        return [e.url.rsplit("/", 1)[1] for e in found]

    assert urls(book.entries()) == ["a", "d", "c", "b", "local"]  # newest first, then last added
    assert urls(book.entries(host="api.example.com")) == ["a", "d", "c"]
    assert urls(book.entries(host="API.example.COM:443")) == ["a", "d", "c"]
    assert urls(book.entries(host="other.example.org")) == ["b"]
    assert urls(book.entries(host="::1")) == ["local"]
    assert urls(book.entries(host="[::1]:8080")) == ["local"]
    assert urls(book.entries(since=10, until=30)) == ["d", "c", "b"]
    assert urls(book.entries(host="api.example.com", since=21)) == ["a"]
    assert urls(book.entries(limit=2)) == ["a", "d"]
    assert book.entries(limit=0) == []
    assert book.entries(host="nowhere.example") == []
    assert MAX_ENTRIES == 10_000


def test_a_duplicate_receipt_is_refused(book: ReceiptBook) -> None:
    book.add(entry(1))
    with pytest.raises(PaymentError) as refused:
        book.add(entry(2, receipt_ref="jti:1"))
    assert refused.value.code == "receipt_invalid"
    assert "jti:1 is already in the receipt book" in refused.value.message
    assert [e.at for e in book.entries()] == [1]


def test_entries_are_validated() -> None:
    with pytest.raises(ConfigError):
        entry(1, amount=-1)
    with pytest.raises(ConfigError):
        entry(1, amount="10")
    with pytest.raises(ConfigError):
        entry(1, verified=1)


def test_the_file_is_private_append_only_and_persistent(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "receipts.db"
    with ReceiptBook(path) as book:
        book.add(entry(1))
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode & 0o077 == 0, (suffix, oct(mode))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for statement in ("UPDATE receipts SET amount = '0'", "DELETE FROM receipts"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    conn.close()
    with ReceiptBook(path) as again:
        assert again.entries() == [entry(1)]


def test_closed_or_unusable_books_are_store_unavailable(tmp_path: Path) -> None:
    book = ReceiptBook(None)
    book.close()
    book.close()
    with pytest.raises(PaymentError) as closed:
        book.entries()
    assert closed.value.code == "store_unavailable"
    (tmp_path / "hidden-dir").mkdir()
    with pytest.raises(PaymentError) as failed:
        ReceiptBook(tmp_path / "hidden-dir")
    assert failed.value.code == "store_unavailable"
    assert "hidden-dir" not in failed.value.message
