-- Locks the lease row of instance $1 while identity $2 holds a live lease and
-- returns its election time, or no row. The share lock keeps another node from
-- taking over the lease until the calling transaction ends. clock_timestamp()
-- is used because the transaction may have waited for a lock since it began.
SELECT elected_at
FROM {prefix}.oban_leaders
WHERE name = $1
  AND node = $2
  AND expires_at > timezone('UTC', clock_timestamp())
FOR SHARE
