-- Inserts a batch in one statement. Rows are inserted in input order, so the
-- returned ids sorted ascending match the input. One row comes back: the ids
-- and the statement's time, which is every row's inserted_at and the
-- scheduled_at of rows given none, so the caller sets the other fields itself
-- instead of decoding a row per job. Available jobs notify their queue once
-- per statement; the notification is delivered on commit, so a rolled-back
-- insert notifies no listener. The payload never carries args, because PostgreSQL
-- caps a notification at 8000 bytes.
WITH inserted AS (
    INSERT INTO {prefix}.oban_jobs
        (state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, inserted_at)
    SELECT
        CASE WHEN r.scheduled_at IS NULL OR r.scheduled_at <= timezone('UTC', now())
             THEN 'available' ELSE 'scheduled' END::{prefix}.oban_job_state,
        r.queue,
        r.worker,
        r.args::jsonb,
        r.meta::jsonb,
        CASE WHEN r.tags = '[]' THEN ARRAY[]::text[] ELSE ARRAY(SELECT jsonb_array_elements_text(r.tags::jsonb)) END,
        r.max_attempts,
        r.priority,
        coalesce(r.scheduled_at, timezone('UTC', now())),
        timezone('UTC', now())
    FROM unnest(
        $1::text[],
        $2::text[],
        $3::text[],
        $4::text[],
        $5::text[],
        $6::int[],
        $7::int[],
        $8::timestamp[]
    ) WITH ORDINALITY AS r(queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, n)
    ORDER BY r.n
    RETURNING id, state, queue
),
notified AS (
    SELECT pg_notify('{prefix}.oban_insert', '{"queue":' || to_json(q.queue)::text || '}')
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') q
)
SELECT array_agg(i.id ORDER BY i.id) AS ids, timezone('UTC', now()) AS now
FROM inserted i, (SELECT count(*) FROM notified) n
