-- Inserts or heartbeats one oban_producers row per producer of this node
-- instance ($1 name, $2 node) and stores its current meta. Returns each uuid
-- and whether the row was new.
INSERT INTO {prefix}.oban_producers AS p (uuid, name, node, queue, meta, started_at, updated_at)
SELECT r.uuid, $1, $2, r.queue, r.meta::jsonb, timezone('UTC', now()), timezone('UTC', now())
FROM unnest($3::uuid[], $4::text[], $5::text[]) AS r(uuid, queue, meta)
ON CONFLICT (uuid) DO UPDATE SET
    meta = EXCLUDED.meta,
    updated_at = EXCLUDED.updated_at
RETURNING p.uuid::text, (xmax = 0) AS inserted
