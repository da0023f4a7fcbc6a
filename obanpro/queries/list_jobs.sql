-- Jobs matching the optional filters (NULL matches everything), newest first,
-- with the number of matching jobs in every row for "showing n of total".
SELECT id, state::text, queue, worker, attempt, max_attempts, priority, args::text, meta::text,
       to_jsonb(errors)::text AS errors, tags, attempted_by, inserted_at, scheduled_at,
       attempted_at, cancelled_at, completed_at, discarded_at,
       count(*) OVER () AS total
FROM {prefix}.oban_jobs
WHERE ($1::text[] IS NULL OR state::text = ANY($1))
  AND ($2::text[] IS NULL OR queue = ANY($2))
  AND ($3::text[] IS NULL OR worker = ANY($3))
  AND ($4::bigint[] IS NULL OR id = ANY($4))
ORDER BY id DESC
LIMIT $5
