-- Jobs waiting to run (available, scheduled or suspended), newest first.
SELECT id, state::text, queue, worker, attempt, max_attempts, priority, args::text, meta::text,
       to_jsonb(errors)::text AS errors, tags, attempted_by, inserted_at, scheduled_at,
       attempted_at, cancelled_at, completed_at, discarded_at
FROM {prefix}.oban_jobs
WHERE state IN ('available', 'scheduled', 'suspended')
ORDER BY id DESC
