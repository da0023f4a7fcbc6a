-- Reads whole rows of the given jobs and locks them until the transaction
-- ends, in id order, so an update computed from them cannot race another.
SELECT id, state::text, queue, worker, attempt, max_attempts, priority, args::text, meta::text,
       to_jsonb(errors)::text AS errors, tags, attempted_by, inserted_at, scheduled_at,
       attempted_at, cancelled_at, completed_at, discarded_at
FROM {prefix}.oban_jobs
WHERE id = ANY($1::bigint[])
ORDER BY id
FOR UPDATE
