-- Makes available again the rows a producer marked executing without knowing
-- it: the fetch committed but its reply was lost with the connection. The
-- attempt is given back because the job never started.
UPDATE {prefix}.oban_jobs
SET state = 'available',
    attempt = attempt - 1
WHERE state = 'executing'
  AND queue = $1
  AND attempted_by[2] = $2
  AND id <> ALL($3::bigint[])
RETURNING id
