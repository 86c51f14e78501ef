"""policyd's shared state in SQL, one module per concern: :mod:`.ratelimit` (atomic counting),
:mod:`.greylist`, :mod:`.overrides` (for the CLI), :mod:`.purge`, and :mod:`.transactions`
(isolation, SQLite locking, compiled statements).

Every function here is synchronous and takes an Engine: the daemon runs them in the database
thread pool (never on the reactor), the CLI and tests call them directly. Time is an argument
(epoch seconds), never read here. The two checks, :func:`.ratelimit.rate_check` and
:func:`.greylist.greylist_check`, also take a Connection inside a transaction its owner commits: that is
how :mod:`policyd.batch` runs many of them in one transaction on SQLite.

Atomicity across processes and hosts (several MX on one PostgreSQL or MariaDB):

- :func:`.ratelimit.rate_check` runs in ONE transaction that first upserts the subject's lock row
  (``INSERT ... ON CONFLICT DO UPDATE`` on PostgreSQL and SQLite, ``INSERT ... ON DUPLICATE
  KEY UPDATE`` on MariaDB). The upsert takes that row's write lock until commit, so every other
  check of the same subject waits there; the bucket read that follows sees everything the
  earlier transactions committed (see :func:`.transactions.transaction`), and the buckets are incremented
  only when every window admits the message: a refused message is never counted.
- Greylisting reads the triplet with ``SELECT ... FOR UPDATE`` after an insert-if-absent, so
  two hosts seeing the same retry agree on its first pass.
"""

