SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1
  AND c.relkind IN ('r', 'p')
  AND c.relname = ANY('{oban_jobs,oban_leaders,oban_producers}'::text[])
ORDER BY c.relname
