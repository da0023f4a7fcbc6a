-- Inserts the cron jobs due at minute $9 (UTC), scheduled at that minute and
-- available unless the minute lies ahead. It skips each entry that already
-- has a job for the minute: a row of the same worker, queue and priority
-- scheduled at $9 whose meta.cron_name matches. The state list lets that
-- lookup use the (state, queue, priority, scheduled_at) index. Callers hold
-- the cron advisory lock, so no two inserts for one minute overlap. Available
-- jobs notify their queue once, on commit.
WITH entries AS (
    SELECT *
    FROM unnest(
        $1::text[],
        $2::text[],
        $3::text[],
        $4::text[],
        $5::text[],
        $6::int[],
        $7::int[],
        $8::text[]
    ) WITH ORDINALITY AS e(queue, worker, args, meta, tags, max_attempts, priority, cron_name, n)
),
inserted AS (
    INSERT INTO {prefix}.oban_jobs
        (state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at)
    SELECT
        CASE WHEN $9::timestamp <= timezone('UTC', now())
             THEN 'available' ELSE 'scheduled' END::{prefix}.oban_job_state,
        e.queue,
        e.worker,
        e.args::jsonb,
        e.meta::jsonb,
        ARRAY(SELECT jsonb_array_elements_text(e.tags::jsonb)),
        e.max_attempts,
        e.priority,
        $9::timestamp
    FROM entries e
    WHERE NOT EXISTS (
        SELECT 1
        FROM {prefix}.oban_jobs j
        WHERE j.state = ANY(enum_range(NULL::{prefix}.oban_job_state))
          AND j.queue = e.queue
          AND j.priority = e.priority
          AND j.scheduled_at = $9::timestamp
          AND j.worker = e.worker
          AND j.meta->>'cron_name' = e.cron_name
    )
    ORDER BY e.n
    RETURNING id, queue
),
notified AS (
    SELECT pg_notify('{prefix}.oban_insert', '{"queue":' || to_json(q.queue)::text || '}')
    FROM (SELECT DISTINCT queue FROM inserted) q
)
SELECT i.id, i.queue
FROM inserted i, (SELECT count(*) FROM notified) n
ORDER BY i.id
