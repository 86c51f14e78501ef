"""PostgreSQL: policyd's greylisting batch as a function, planned once per connection and
always through the primary keys.

policyd decides a batch of greylisting sightings in one statement (see
``policyd/sql/greylist.py``). Parsed and planned anew for every batch, that statement spent
as much of PostgreSQL's CPU on planning as on its work; prepared, PostgreSQL keeps a generic
plan, and one made while the tables were small (a new installation) read them whole and went
on doing so as they grew. In a PL/pgSQL function the plan is kept for the connection's life,
and the function's settings make every plan of it, made at whatever size, join the batch's
rows to the tables through their primary keys, which stays the right plan as the tables
grow.

The function reads the batch's client and triplet rows and sorts each sighting as
``greylist_many`` would decide it one by one (``seen.step``: 'n' a new triplet, 'p' a first
pass, NULL anything else, decided one by one by policyd afterwards), inserts the new
triplets in key order (a row another host inserted meanwhile is only touched and returned as
stored), marks the first passes in key order only on rows still unpassed with the first-seen
time read (compare-and-set: PostgreSQL checks the condition again on a row another host
changed since the statement's snapshot), and counts the passing clients in address order, at
most one pass per client and hour. The sub-statements run in the order written (the
``UNION ALL`` reads ``inserted`` to its end before ``passing``; ``counting`` runs last), so
hosts running it on overlapping batches take their row locks in one order. Returns
``('n', key, first_seen, passed)`` per inserted or touched triplet and
``('p', key, first_seen, NULL)`` per first pass. Each column of the batch's rows comes as one
comma-separated text.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DECIDE = """
CREATE FUNCTION policy_greylist_decide(
    keys text, addresses text, nows text,
    awl integer, expiry bigint, delay bigint, retry_window bigint)
RETURNS TABLE (kind text, key text, first_seen bigint, passed boolean)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $body$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH v AS (
  SELECT * FROM unnest(string_to_array(keys, ','), string_to_array(addresses, ','),
                       string_to_array(nows, ',')::bigint[]) AS v(key, address, now)
), seen AS (
  SELECT v.key, v.address, v.now, e.first_seen,
         CASE WHEN awl > 0 AND c.passes >= awl AND v.now - c.last_seen <= expiry
              THEN NULL
              WHEN e.key IS NULL THEN 'n'
              WHEN NOT e.passed AND v.now - e.first_seen BETWEEN delay AND retry_window
              THEN 'p'
         END AS step
  FROM v LEFT JOIN policy_greylist_clients c ON c.address = v.address
         LEFT JOIN policy_greylist e ON e.key = v.key
), inserted AS (
  INSERT INTO policy_greylist AS e (key, first_seen, last_seen, passed)
  SELECT s.key, s.now, s.now, false FROM seen s WHERE s.step = 'n' ORDER BY s.key
  ON CONFLICT (key) DO UPDATE SET last_seen = excluded.last_seen
  RETURNING e.key, e.first_seen, e.passed
), passing AS (
  UPDATE policy_greylist e SET passed = true, last_seen = p.now
  FROM (SELECT * FROM seen WHERE seen.step = 'p' ORDER BY seen.key) AS p
  WHERE e.key = p.key AND e.first_seen = p.first_seen AND NOT e.passed
  RETURNING e.key, e.first_seen, p.address, p.now
), counting AS (
  INSERT INTO policy_greylist_clients AS c (address, passes, last_counted, last_seen)
  SELECT p.address, 1, p.now, p.now FROM passing p WHERE awl > 0 ORDER BY p.address
  ON CONFLICT (address) DO UPDATE SET
    passes = CASE WHEN c.last_counted <= excluded.last_counted - 3600
                  THEN c.passes + 1 ELSE c.passes END,
    last_counted = CASE WHEN c.last_counted <= excluded.last_counted - 3600
                        THEN excluded.last_counted ELSE c.last_counted END,
    last_seen = excluded.last_seen
)
SELECT 'n'::text, i.key::text, i.first_seen, i.passed FROM inserted i
UNION ALL SELECT 'p'::text, p.key::text, p.first_seen, NULL::boolean FROM passing p;
END
$body$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DECIDE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION policy_greylist_decide(text, text, text, integer, bigint, "
                   "bigint, bigint)")
