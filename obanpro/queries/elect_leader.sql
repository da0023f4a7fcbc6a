-- Takes or renews the leader lease of instance $1 for identity $2, for $3
-- seconds. The row is taken over when it belongs to $2 or its lease has
-- expired, so one statement does what oban-py does with a cleanup and an
-- insert. elected_at moves only when the lease changes hands or had lapsed.
-- Returns the holder and its election time, or no row when another identity
-- holds a live lease.
INSERT INTO {prefix}.oban_leaders AS l (name, node, elected_at, expires_at)
VALUES ($1, $2, timezone('UTC', now()), timezone('UTC', now()) + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET
    node = EXCLUDED.node,
    elected_at = CASE
        WHEN l.node = EXCLUDED.node AND l.expires_at >= EXCLUDED.elected_at THEN l.elected_at
        ELSE EXCLUDED.elected_at
    END,
    expires_at = EXCLUDED.expires_at
WHERE l.node = EXCLUDED.node
   OR l.expires_at < EXCLUDED.elected_at
RETURNING node, elected_at
