-- Writes the updatable fields of jobs read by lock_jobs_for_update.sql in the
-- same transaction. An available job whose new scheduled_at lies in the
-- future becomes scheduled, and a scheduled one whose new time has come
-- becomes available; other states are kept.
UPDATE {prefix}.oban_jobs j
SET args = u.args::jsonb,
    max_attempts = u.max_attempts,
    meta = u.meta::jsonb,
    priority = u.priority,
    queue = u.queue,
    scheduled_at = u.scheduled_at,
    tags = ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)),
    worker = u.worker,
    state = CASE
        WHEN j.state = 'available' AND u.scheduled_at > timezone('UTC', now()) THEN 'scheduled'
        WHEN j.state = 'scheduled' AND u.scheduled_at <= timezone('UTC', now()) THEN 'available'
        ELSE j.state
    END
FROM unnest(
    $1::bigint[],
    $2::text[],
    $3::int[],
    $4::text[],
    $5::int[],
    $6::text[],
    $7::timestamp[],
    $8::text[],
    $9::text[]
) AS u(id, args, max_attempts, meta, priority, queue, scheduled_at, tags, worker)
WHERE j.id = u.id
RETURNING j.id, j.state::text, j.queue, j.worker, j.attempt, j.max_attempts, j.priority, j.args::text,
          j.meta::text, to_jsonb(j.errors)::text AS errors, j.tags, j.attempted_by, j.inserted_at,
          j.scheduled_at, j.attempted_at, j.cancelled_at, j.completed_at, j.discarded_at
