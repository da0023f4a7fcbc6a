-- Drops what install.sql creates in {prefix}; the schema itself goes only when
-- it is not public and nothing else is left in it.

DROP TABLE IF EXISTS "{prefix}".oban_producers;
DROP TABLE IF EXISTS "{prefix}".oban_leaders;
DROP TABLE IF EXISTS "{prefix}".oban_jobs;
DROP FUNCTION IF EXISTS "{prefix}".oban_count_estimate(text, text);
DROP TYPE IF EXISTS "{prefix}".oban_job_state;
