"""A store in Redis: claims and the log shared by every process that reaches the same server.

Needs the ``redis`` extra (redis-py 5+, ``redis.asyncio``). Every key starts with ``prefix``.

Layout (``P`` is the prefix):

- ``P claim:<key>``: a string, the claim as JSON. A claim is ``SET ... NX``, atomic across every
  client of the server. Held claims are also in the sorted set ``P held`` and pending ones in
  ``P pending`` (score: the claim's ``at``), which :meth:`RedisStore.unfinished` reads.
- ``P idem:<key>``: a string, the idempotency entry as JSON (body base64), taken with ``SET NX``.
- Invoices: ``P invoice:<reference>`` (a string, the invoice as JSON), ``P invoice-pi:<payment
  intent>`` (a string, the reference: what :meth:`RedisStore.find_invoice` reads) and the sorted
  set ``P invoices:expiry`` (member: the reference, score: ``expires_at``), which pruning walks.
  An invoice's three keys are written by one script that first checks that neither of its two
  string keys exists, so a duplicate reference or payment intent changes nothing.
- The log: ``P events:seq`` (the id counter), ``P events`` (a hash, id -> the event as JSON) and
  sorted-set indexes whose score is the event's ``at`` and whose member is its id written with 20
  digits, so that equal times order by id: ``P ix:all``, ``P ix:kind:<kind>``,
  ``P ix:payer:<payer key>``, ``P ix:route:<route>`` and ``P ix:ref:<reference>``. Traffic
  events (:data:`~farebox.store.base.TRAFFIC_KINDS`) are also in ``P ix:traffic``, which pruning
  walks oldest first, and counted in the hash ``P traffic:counts`` (field: the JSON of ``[day,
  kind, route, code]``, value: the count), by the script that appends them.

Costs. Appending an event is one ``HSET`` and three to five ``ZADD`` (O(log N) each), about
150 bytes of index per event. A query walks, newest first, the smallest index its filters name
(``ix:all`` without one), within ``since``/``until`` by score, and tests each id against the other
filters' indexes with ``ZSCORE`` (O(1)); so a query with one filter costs O(log N + limit), and
one whose filters rarely match together costs up to the size of the smallest index in range.
Queries run as Lua scripts, which block the Redis server while they run: give such queries a time
range on big logs.

Every change is one Lua script, which Redis runs atomically: a finish updates the claim and
appends its events with no other client in between. Redis does not roll a script back, so
everything that can fail (encoding event data) happens in Python first. Durability is Redis's:
with the default snapshotting a crash can forget recent claims, and a forgotten claim lets its
proof be used again: run Redis with ``appendonly yes`` (and ``appendfsync everysec`` or
``always``) for payments. The scripts name keys that depend on their arguments (the indexes), so
this store needs one Redis server, not a Redis Cluster.

Every redis error becomes :func:`~farebox.store.sqlite.store_unavailable` with the original error
as ``__cause__``; no message names the URL, which may hold a password.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from farebox.errors import ConfigError, PaymentError
from farebox.store.base import (
    TRAFFIC_KINDS,
    Claim,
    ClaimState,
    Event,
    IdempotencyEntry,
    Invoice,
    StoredResponse,
    TrafficCount,
    check_finish_state,
    claim_not_held,
    clamp_limit,
    decode_event_data,
    encode_event_data,
    invoice_claim_key,
    invoice_conflict,
    invoice_id_ok,
    payer_key,
    traffic_tally,
)
from farebox.store.sqlite import decode_headers, encode_headers, store_unavailable

__all__ = ["RedisStore"]

# Appends the events packed in ARGV from index i: a count, then for each event its `at`, its JSON,
# the number of its indexes and their key names, then the traffic count it adds to: the counts'
# hash key and field, or two empty strings.
_APPEND_LUA = """
local function append(seq, hash, argv, i)
  local n = tonumber(argv[i])
  i = i + 1
  for _ = 1, n do
    local at, body, nidx = argv[i], argv[i + 1], tonumber(argv[i + 2])
    i = i + 3
    local id = string.format('%020d', redis.call('INCR', seq))
    redis.call('HSET', hash, id, body)
    for j = 0, nidx - 1 do
      redis.call('ZADD', argv[i + j], at, id)
    end
    i = i + nidx
    if argv[i] ~= '' then redis.call('HINCRBY', argv[i], argv[i + 1], 1) end
    i = i + 2
  end
end
"""

# KEYS: events. ARGV: a count, then for each event its id, the number of its indexes and their
# key names. An event another prune removed first is skipped.
_PRUNE_TRAFFIC_LUA = """
local n, i, deleted = tonumber(ARGV[1]), 2, 0
for _ = 1, n do
  local id, nidx = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if redis.call('HDEL', KEYS[1], id) == 1 then
    deleted = deleted + 1
    for j = 0, nidx - 1 do
      redis.call('ZREM', ARGV[i + j], id)
    end
  end
  i = i + nidx
end
return deleted
"""

# KEYS: claim, held. ARGV: claim JSON, at, key.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: claim, held. ARGV: owner, key.
_RELEASE_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local c = cjson.decode(raw)
if c.owner ~= ARGV[1] or c.state ~= 'held' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: claim, held, pending, events:seq, events. ARGV: owner, key, state, txn, has txn, events.
_FINISH_LUA = (
    _APPEND_LUA
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local c = cjson.decode(raw)
if c.owner ~= ARGV[1] or c.state ~= 'held' then return 0 end
c.state = ARGV[3]
if ARGV[5] == '1' then c.txn = ARGV[4] else c.txn = cjson.null end
redis.call('SET', KEYS[1], cjson.encode(c))
redis.call('ZREM', KEYS[2], ARGV[2])
if c.state == 'pending' then redis.call('ZADD', KEYS[3], c.at, ARGV[2]) end
append(KEYS[4], KEYS[5], ARGV, 6)
return 1
"""
)

# KEYS: claim, held, pending, events:seq, events. ARGV: key, settled, txn, has txn, events.
_RESOLVE_LUA = (
    _APPEND_LUA
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local c = cjson.decode(raw)
if c.state ~= 'held' and c.state ~= 'pending' then return 0 end
if ARGV[2] == '1' then
  c.state = 'settled'
  if ARGV[4] == '1' then c.txn = ARGV[3] else c.txn = cjson.null end
  redis.call('SET', KEYS[1], cjson.encode(c))
else
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
append(KEYS[4], KEYS[5], ARGV, 5)
return 1
"""
)

# KEYS: events:seq, events. ARGV: events.
_APPEND_ONLY_LUA = _APPEND_LUA + "\nappend(KEYS[1], KEYS[2], ARGV, 1)\nreturn 1\n"

# KEYS: held, pending. ARGV: held_before, limit, claim key prefix. Returns key, JSON, key, JSON...
_UNFINISHED_LUA = """
local out = {}
local function add(keys)
  for _, k in ipairs(keys) do
    local raw = redis.call('GET', ARGV[3] .. k)
    if raw then
      out[#out + 1] = k
      out[#out + 1] = raw
    end
  end
end
add(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2]))
add(redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1))
return out
"""

# KEYS: events, then the indexes the filters name (at least one). ARGV: max, min, limit, batch.
# Walks the smallest index newest first, keeping ids present in every other index.
_QUERY_LUA = """
local max, min, limit, batch = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local drive, best = 2, nil
for i = 2, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if best == nil or n < best then drive, best = i, n end
end
local out = {}
local offset = 0
while #out < limit do
  local ids = redis.call('ZREVRANGEBYSCORE', KEYS[drive], max, min, 'LIMIT', offset, batch)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local keep = true
    for i = 2, #KEYS do
      if i ~= drive and not redis.call('ZSCORE', KEYS[i], id) then
        keep = false
        break
      end
    end
    if keep then
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', KEYS[1], id)
      if #out >= 2 * limit then break end
    end
  end
  offset = offset + #ids
end
return out
"""

# KEYS: entry. ARGV: entry JSON. Nil when taken, else the existing entry.
_BEGIN_IDEMPOTENT_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return nil end
return redis.call('GET', KEYS[1])
"""

# KEYS: entry. ARGV: owner, status, headers JSON, body base64.
_COMPLETE_IDEMPOTENT_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local e = cjson.decode(raw)
if e.owner ~= ARGV[1] or (e.status ~= nil and e.status ~= cjson.null) then return 0 end
e.status = tonumber(ARGV[2])
e.headers = ARGV[3]
e.body = ARGV[4]
redis.call('SET', KEYS[1], cjson.encode(e))
return 1
"""

# KEYS: entry. ARGV: owner.
_ABANDON_IDEMPOTENT_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local e = cjson.decode(raw)
if e.owner ~= ARGV[1] or (e.status ~= nil and e.status ~= cjson.null) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: entry. ARGV: owner, new owner, at, claim (empty for none).
_REOPEN_IDEMPOTENT_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local e = cjson.decode(raw)
if e.owner ~= ARGV[1] or e.status == nil or e.status == cjson.null then return 0 end
local claim = cjson.null
if ARGV[4] ~= '' then claim = ARGV[4] end
redis.call('SET', KEYS[1], cjson.encode({fingerprint = e.fingerprint, owner = ARGV[2],
  at = tonumber(ARGV[3]), claim = claim}))
return 1
"""

# KEYS: invoice, invoice-pi, invoices:expiry. ARGV: invoice JSON, reference, expires_at.
_ADD_INVOICE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# KEYS: invoice-pi. ARGV: invoice key prefix. The invoice JSON, or nil. One script: the two reads
# see one state (a prune cannot delete the invoice between them).
_FIND_INVOICE_LUA = """
local reference = redis.call('GET', KEYS[1])
if not reference then return nil end
return redis.call('GET', ARGV[1] .. reference)
"""

# KEYS: invoices:expiry. ARGV: before, limit, batch, invoice key prefix, invoice-pi key prefix,
# claim key prefix of invoices. Walks expired references oldest first. One whose claim exists is
# kept; a settled claim is final, so its reference also leaves the index (later prunes need not
# walk it again), while held and pending claims may still be removed and stay in it.
_PRUNE_INVOICES_LUA = """
local before, limit, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local deleted, offset = 0, 0
while deleted < limit do
  local refs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. before, 'LIMIT', offset, batch)
  if #refs == 0 then break end
  for _, ref in ipairs(refs) do
    local claim = redis.call('GET', ARGV[6] .. ref)
    if claim then
      if cjson.decode(claim).state == 'settled' then
        redis.call('ZREM', KEYS[1], ref)
      else
        offset = offset + 1
      end
    else
      local raw = redis.call('GET', ARGV[4] .. ref)
      if raw then
        local pi = ARGV[5] .. cjson.decode(raw).payment_intent
        if redis.call('GET', pi) == ref then redis.call('DEL', pi) end
        redis.call('DEL', ARGV[4] .. ref)
      end
      redis.call('ZREM', KEYS[1], ref)
      deleted = deleted + 1
      if deleted >= limit then break end
    end
  end
end
return deleted
"""

# Ids a query script reads from its index per call.
_QUERY_BATCH = 500


class RedisStore:
    """A :class:`~farebox.store.base.Store` in Redis (see the module docstring for the layout).

    Constructing it does no I/O: the connection pool connects on first use (or :meth:`open`).
    ``timeout`` bounds, in seconds, connecting and each command.
    """

    def __init__(self, url: str, *, prefix: str = "farebox:", timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        try:
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                decode_responses=False,
            )
        except (ValueError, RedisError) as exc:
            # Never the URL in the message: it may hold a password.
            raise ConfigError("the Redis URL of the payment store is malformed") from exc
        self._prefix = prefix
        self._held = f"{prefix}held"
        self._pending = f"{prefix}pending"
        self._seq = f"{prefix}events:seq"
        self._events = f"{prefix}events"
        self._traffic = f"{prefix}ix:traffic"
        self._traffic_counts = f"{prefix}traffic:counts"
        self._invoice_expiry = f"{prefix}invoices:expiry"
        self._closed = False
        register = self._client.register_script
        self._claim_script = register(_CLAIM_LUA)
        self._release_script = register(_RELEASE_LUA)
        self._finish_script = register(_FINISH_LUA)
        self._resolve_script = register(_RESOLVE_LUA)
        self._append_script = register(_APPEND_ONLY_LUA)
        self._unfinished_script = register(_UNFINISHED_LUA)
        self._query_script = register(_QUERY_LUA)
        self._begin_script = register(_BEGIN_IDEMPOTENT_LUA)
        self._complete_script = register(_COMPLETE_IDEMPOTENT_LUA)
        self._abandon_script = register(_ABANDON_IDEMPOTENT_LUA)
        self._reopen_script = register(_REOPEN_IDEMPOTENT_LUA)
        self._prune_traffic_script = register(_PRUNE_TRAFFIC_LUA)
        self._add_invoice_script = register(_ADD_INVOICE_LUA)
        self._find_invoice_script = register(_FIND_INVOICE_LUA)
        self._prune_invoices_script = register(_PRUNE_INVOICES_LUA)

    def __repr__(self) -> str:
        # Never the URL: it may hold a password.
        return f"RedisStore(prefix={self._prefix!r})"

    @classmethod
    async def open(cls, url: str, *, prefix: str = "farebox:", timeout: float = 5.0) -> RedisStore:
        """A store on ``url``, connected now (raises ``store_unavailable`` if it cannot be)."""
        store = cls(url, prefix=prefix, timeout=timeout)
        store._check_open()
        try:
            await store._client.ping()
        except (RedisError, OSError) as exc:
            await store.aclose()
            raise store_unavailable() from exc
        return store

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the Store protocol ----------------------------------------------------------------------

    async def claim(self, key: str, *, owner: str, now: int) -> Claim | None:
        """See :meth:`farebox.store.base.Store.claim`."""
        value = orjson.dumps({"owner": owner, "state": "held", "at": now, "txn": None})
        won = await self._run(
            self._claim_script, [self._claim_key(key), self._held], [value, now, key]
        )
        return Claim(key, owner, "held", now) if won == 1 else None

    async def release(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.release`."""
        done = await self._run(
            self._release_script, [self._claim_key(key), self._held], [owner, key]
        )
        return bool(done == 1)

    async def finish(
        self,
        key: str,
        *,
        owner: str,
        state: Literal["settled", "pending"],
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> None:
        """See :meth:`farebox.store.base.Store.finish`."""
        check_finish_state(state)
        args: list[Any] = [owner, key, state, transaction or "", 0 if transaction is None else 1]
        args += self._packed(events)
        done = await self._run(self._finish_script, self._change_keys(key), args)
        if done != 1:
            raise claim_not_held()

    async def get_claim(self, key: str) -> Claim | None:
        """See :meth:`farebox.store.base.Store.get_claim`."""
        self._check_open()
        try:
            raw = await self._client.get(self._claim_key(key))
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc
        return None if raw is None else _claim(key, raw)

    async def append(self, *events: Event) -> None:
        """See :meth:`farebox.store.base.Store.append`."""
        packed = self._packed(events)
        if not events:
            return
        await self._run(self._append_script, [self._seq, self._events], packed)

    async def events(
        self,
        *,
        kind: str | None = None,
        payer: str | None = None,
        route: str | None = None,
        since: int | None = None,
        until: int | None = None,
        reference: str | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """See :meth:`farebox.store.base.Store.events`."""
        wanted = clamp_limit(limit)
        if wanted == 0:
            self._check_open()
            return []
        indexes = [
            f"{self._prefix}ix:{name}:{value}"
            for name, value in (
                ("kind", kind),
                ("payer", payer_key(payer) if payer is not None else None),
                ("route", route),
                ("ref", reference),
            )
            if value is not None
        ] or [f"{self._prefix}ix:all"]
        high = "+inf" if until is None else f"({int(until)}"
        low = "-inf" if since is None else str(int(since))
        found = await self._run(
            self._query_script, [self._events, *indexes], [high, low, wanted, _QUERY_BATCH]
        )
        return [_event(int(found[i]), found[i + 1]) for i in range(0, len(found), 2)]

    async def unfinished(self, *, held_before: int, limit: int = 100) -> list[Claim]:
        """See :meth:`farebox.store.base.Store.unfinished`."""
        wanted = clamp_limit(limit)
        if wanted == 0:
            self._check_open()
            return []
        found = await self._run(
            self._unfinished_script,
            [self._held, self._pending],
            [int(held_before), wanted, f"{self._prefix}claim:"],
        )
        claims = [_claim(found[i].decode(), found[i + 1]) for i in range(0, len(found), 2)]
        claims.sort(key=lambda claim: (claim.at, claim.key))
        return claims[:wanted]

    async def resolve(
        self,
        key: str,
        *,
        settled: bool,
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """See :meth:`farebox.store.base.Store.resolve`."""
        args: list[Any] = [key, 1 if settled else 0, transaction or ""]
        args.append(0 if transaction is None else 1)
        args += self._packed(events)
        done = await self._run(self._resolve_script, self._change_keys(key), args)
        return bool(done == 1)

    async def begin_idempotent(
        self, key: str, *, fingerprint: str, owner: str, now: int, claim: str | None = None
    ) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.begin_idempotent`."""
        value = orjson.dumps(
            {"fingerprint": fingerprint, "owner": owner, "at": now, "claim": claim}
        )
        raw = await self._run(self._begin_script, [self._idem_key(key)], [value])
        return None if raw is None else _entry(key, raw)

    async def complete_idempotent(self, key: str, *, owner: str, response: StoredResponse) -> None:
        """See :meth:`farebox.store.base.Store.complete_idempotent`."""
        args = [
            owner,
            int(response.status),
            encode_headers(response.headers),
            base64.b64encode(bytes(response.body)),
        ]
        if await self._run(self._complete_script, [self._idem_key(key)], args) != 1:
            raise claim_not_held()

    async def abandon_idempotent(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.abandon_idempotent`."""
        done = await self._run(self._abandon_script, [self._idem_key(key)], [owner])
        return bool(done == 1)

    async def reopen_idempotent(
        self, key: str, *, owner: str, new_owner: str, now: int, claim: str | None
    ) -> bool:
        """See :meth:`farebox.store.base.Store.reopen_idempotent`."""
        args = [owner, new_owner, now, claim or ""]
        done = await self._run(self._reopen_script, [self._idem_key(key)], args)
        return bool(done == 1)

    async def get_idempotent(self, key: str) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.get_idempotent`."""
        self._check_open()
        try:
            raw = await self._client.get(self._idem_key(key))
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc
        return None if raw is None else _entry(key, raw)

    async def prune_traffic(self, *, before: int, keep: int, limit: int = 10_000) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic`."""
        self._check_open()
        wanted = clamp_limit(limit)
        if not wanted:
            return 0
        try:
            old = await self._client.zrangebyscore(
                self._traffic, "-inf", f"({int(before)}", start=0, num=wanted
            )
            beyond = await self._client.zcard(self._traffic) - max(0, keep)
            # Only as many as one call deletes: after a flood, "beyond" may be millions.
            over = (
                await self._client.zrange(self._traffic, 0, min(beyond, wanted) - 1)
                if beyond > 0
                else []
            )
            # Ids are zero-padded: their order is the log's.
            newest = await self._client.get(self._seq)
            found: set[bytes] = {bytes(i) for i in (*old, *over)}
            # Never the newest event of the log, as every store does (SQLite would reuse its id).
            found.discard(b"%020d" % int(newest or 0))
            ids = sorted(found)[:wanted]
            bodies = await self._client.hmget(self._events, ids) if ids else []
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc
        args: list[Any] = [0]
        for event_id, raw in zip(ids, bodies, strict=True):
            if raw is None:
                continue  # pruned meanwhile
            kind, _, route, payer, reference, _ = orjson.loads(raw)
            key = payer_key(payer) if payer is not None else None
            indexes = self._indexes(kind, route, key, reference)
            args += [event_id, len(indexes), *indexes]
            args[0] += 1
        if not args[0]:
            return 0
        return int(await self._run(self._prune_traffic_script, [self._events], args))

    async def traffic_counts(self, *, since: int = 0) -> list[TrafficCount]:
        """See :meth:`farebox.store.base.Store.traffic_counts`."""
        self._check_open()
        try:
            raw = await self._client.hgetall(self._traffic_counts)
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc
        counts: list[TrafficCount] = []
        for field, n in raw.items():
            day, kind, route, code = orjson.loads(field)
            counts.append(TrafficCount(int(day), kind, route, code, int(n)))
        counts.sort(key=lambda c: (c.day, c.kind, c.route, c.code))
        return [count for count in counts if count.day >= since]

    async def prune_traffic_counts(self, *, before: int) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic_counts`."""
        old = [c for c in await self.traffic_counts() if c.day < before]
        if not old:
            return 0
        fields = [orjson.dumps([c.day, c.kind, c.route, c.code]) for c in old]
        try:
            return int(await self._client.hdel(self._traffic_counts, *fields))
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc

    async def add_invoice(self, invoice: Invoice) -> None:
        """See :meth:`farebox.store.base.Store.add_invoice`."""
        value = orjson.dumps(_invoice_fields(invoice))
        keys = [
            self._invoice_key(invoice.reference),
            self._invoice_pi_key(invoice.payment_intent),
            self._invoice_expiry,
        ]
        added = await self._run(
            self._add_invoice_script, keys, [value, invoice.reference, invoice.expires_at]
        )
        if added != 1:
            raise invoice_conflict()

    async def get_invoice(self, reference: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.get_invoice`."""
        self._check_open()
        if not invoice_id_ok(reference):
            return None
        try:
            raw = await self._client.get(self._invoice_key(reference))
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc
        return None if raw is None else _invoice(raw)

    async def find_invoice(self, payment_intent: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.find_invoice`."""
        self._check_open()
        if not invoice_id_ok(payment_intent):
            return None
        raw = await self._run(
            self._find_invoice_script,
            [self._invoice_pi_key(payment_intent)],
            [self._invoice_key("")],
        )
        if raw is None:
            return None
        found = _invoice(raw)
        # The index and the record are written together; checked anyway, since a wrong answer here
        # would let one payment stand for another invoice.
        return found if found.payment_intent == payment_intent else None

    async def prune_invoices(self, *, before: int, limit: int = 1000) -> int:
        """See :meth:`farebox.store.base.Store.prune_invoices`.

        Unlike the SQL stores, a prune that finds an invoice's claim settled drops it from the
        expiry index for good (a settled claim is never removed), so that later prunes do not walk
        every paid invoice again.
        """
        wanted = clamp_limit(limit)
        if wanted == 0:
            self._check_open()
            return 0
        deleted = await self._run(
            self._prune_invoices_script,
            [self._invoice_expiry],
            [
                int(before),
                wanted,
                _QUERY_BATCH,
                self._invoice_key(""),
                self._invoice_pi_key(""),
                self._claim_key(invoice_claim_key("")),
            ],
        )
        return int(deleted)

    async def aclose(self) -> None:
        """Close the connections; later calls raise ``store_unavailable``."""
        if self._closed:
            return
        self._closed = True
        # Closing: the connections are gone either way.
        with suppress(RedisError, OSError):
            await self._client.aclose()

    # --- helpers ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PaymentError("store_unavailable", "the payment store is closed")

    def _claim_key(self, key: str) -> str:
        return f"{self._prefix}claim:{key}"

    def _idem_key(self, key: str) -> str:
        return f"{self._prefix}idem:{key}"

    def _invoice_key(self, reference: str) -> str:
        return f"{self._prefix}invoice:{reference}"

    def _invoice_pi_key(self, payment_intent: str) -> str:
        return f"{self._prefix}invoice-pi:{payment_intent}"

    def _change_keys(self, key: str) -> list[str]:
        return [self._claim_key(key), self._held, self._pending, self._seq, self._events]

    def _packed(self, events: Sequence[Event]) -> list[Any]:
        # Encoded here, before any script runs: Redis would not undo a half-run script.
        packed: list[Any] = [len(events)]
        for event in events:
            key = payer_key(event.payer) if event.payer is not None else None
            body = orjson.dumps(
                [
                    event.kind,
                    event.at,
                    event.route,
                    event.payer,
                    event.reference,
                    encode_event_data(event.data),
                ]
            )
            indexes = self._indexes(event.kind, event.route, key, event.reference)
            packed += [int(event.at), body, len(indexes), *indexes]
            tally = traffic_tally(event)
            if tally is None:
                packed += ["", ""]
            else:
                packed += [self._traffic_counts, orjson.dumps(tally)]
        return packed

    def _indexes(
        self, kind: str, route: str, payer: str | None, reference: str | None
    ) -> list[str]:
        """The index keys of an event (``payer`` as :func:`payer_key` gives it)."""
        prefix = self._prefix
        indexes = [f"{prefix}ix:all", f"{prefix}ix:kind:{kind}", f"{prefix}ix:route:{route}"]
        if payer is not None:
            indexes.append(f"{prefix}ix:payer:{payer}")
        if reference is not None:
            indexes.append(f"{prefix}ix:ref:{reference}")
        if kind in TRAFFIC_KINDS:
            indexes.append(self._traffic)
        return indexes

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        self._check_open()
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise store_unavailable() from exc


def _claim(key: str, raw: bytes | str) -> Claim:
    value = orjson.loads(raw)
    state: ClaimState = value["state"]
    return Claim(key, value["owner"], state, int(value["at"]), value.get("txn"))


def _entry(key: str, raw: bytes | str) -> IdempotencyEntry:
    value = orjson.loads(raw)
    status = value.get("status")
    response = (
        None
        if status is None
        else StoredResponse(
            int(status), decode_headers(value["headers"]), base64.b64decode(value["body"])
        )
    )
    # `claim` is absent from entries written before farebox kept it: they read as unknown.
    claim = value.get("claim")
    return IdempotencyEntry(
        key, value["fingerprint"], value["owner"], int(value["at"]), response, claim or None
    )


def _event(event_id: int, raw: bytes | str) -> Event:
    kind, at, route, payer, reference, data = orjson.loads(raw)
    return Event(kind, at, route, payer, reference, decode_event_data(data), event_id)


def _invoice_fields(invoice: Invoice) -> dict[str, Any]:
    return {
        "reference": invoice.reference,
        "route": invoice.route,
        "resource": invoice.resource,
        "amount": invoice.amount,
        "currency": invoice.currency,
        "payment_intent": invoice.payment_intent,
        "created_at": invoice.created_at,
        "expires_at": invoice.expires_at,
    }


def _invoice(raw: bytes | str) -> Invoice:
    value = orjson.loads(raw)
    return Invoice(
        value["reference"],
        value["route"],
        value["resource"],
        int(value["amount"]),
        value["currency"],
        value["payment_intent"],
        int(value["created_at"]),
        int(value["expires_at"]),
    )
