-- Sends one notification per payload on one channel. A function scan returns
-- the array's elements in order, so they are sent in that order.
SELECT pg_notify($1, payload)
FROM unnest($2::text[]) AS payload
