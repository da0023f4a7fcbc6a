-- Gives up the lease of instance $1 when identity $2 holds it, and notifies the
-- other nodes on the leader channel, in the form oban-py sends, so one of them
-- is elected at once instead of after the lease runs out.
WITH resigned AS (
    DELETE FROM {prefix}.oban_leaders
    WHERE name = $1 AND node = $2
    RETURNING node
)
SELECT pg_notify('{prefix}.oban_leader', json_build_object('action', 'resign', 'node', $2::text, 'name', $1::text)::text)
FROM resigned
