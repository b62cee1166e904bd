-- knowton.content_sales_daily as PostgreSQL computes it from the source tables, for purchases created
-- in [%(start)s, %(end)s): the reference the ClickHouse aggregate is reconciled against. Same rules as
-- sql/clickhouse/content_sales_daily_day.sql (UTC days, completed purchases, an empty creator when the
-- content is gone). Columns as the aggregate's, date as text.
SELECT to_char((p."createdAt" AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD') AS date,
       p."contentId" AS content_id,
       coalesce(max(c.creator), '') AS creator,
       p.currency AS currency,
       count(*) AS sales_count,
       sum(p.amount) AS revenue
FROM public."Purchase" p
LEFT JOIN public."Content" c ON c.id = p."contentId"
WHERE p.status = 'completed' AND p."createdAt" >= %(start)s AND p."createdAt" < %(end)s
GROUP BY (p."createdAt" AT TIME ZONE 'UTC')::date, p."contentId", p.currency
