-- Wakes the producers of each queue in $1 with the payload that insert_jobs
-- sends. Inside a transaction the notifications are delivered on commit.
SELECT pg_notify('{prefix}.oban_insert', '{"queue":' || to_json(q)::text || '}')
FROM unnest($1::text[]) AS q
