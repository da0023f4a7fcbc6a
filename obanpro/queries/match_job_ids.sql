-- Ids of the jobs matching the optional filters (NULL matches everything), oldest first.
SELECT id
FROM {prefix}.oban_jobs
WHERE ($1::text[] IS NULL OR state::text = ANY($1))
  AND ($2::text[] IS NULL OR queue = ANY($2))
  AND ($3::text[] IS NULL OR worker = ANY($3))
  AND ($4::bigint[] IS NULL OR id = ANY($4))
ORDER BY id
