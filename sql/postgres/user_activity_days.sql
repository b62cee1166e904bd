-- knowton.user_activity as PostgreSQL computes it from the source tables, for the creation times in
-- [%(start)s, %(end)s): the reference the ClickHouse aggregate is reconciled against. Same rules as
-- sql/clickhouse/user_activity_day.sql (UTC days, completed purchases only, a sale credited to the
-- content's creator and left out when the content is gone). Columns as the aggregate's, date as text.
SELECT to_char(a.day, 'YYYY-MM-DD') AS date, a.user_address, a.action_type, a.action_count, a.total_value
FROM (
    SELECT (u."createdAt" AT TIME ZONE 'UTC')::date AS day, u.address AS user_address,
           'registration' AS action_type, count(*) AS action_count, 0::numeric AS total_value
    FROM public."User" u
    WHERE u."createdAt" >= %(start)s AND u."createdAt" < %(end)s
    GROUP BY 1, 2

    UNION ALL

    SELECT (c."createdAt" AT TIME ZONE 'UTC')::date, c.creator, 'content_created', count(*), sum(c.price)
    FROM public."Content" c
    WHERE c."createdAt" >= %(start)s AND c."createdAt" < %(end)s
    GROUP BY 1, 2

    UNION ALL

    SELECT (p."createdAt" AT TIME ZONE 'UTC')::date, p.buyer, 'purchase', count(*), sum(p.amount)
    FROM public."Purchase" p
    WHERE p.status = 'completed' AND p."createdAt" >= %(start)s AND p."createdAt" < %(end)s
    GROUP BY 1, 2

    UNION ALL

    SELECT (p."createdAt" AT TIME ZONE 'UTC')::date, c.creator, 'sale', count(*), sum(p.amount)
    FROM public."Purchase" p
    JOIN public."Content" c ON c.id = p."contentId"
    WHERE p.status = 'completed' AND p."createdAt" >= %(start)s AND p."createdAt" < %(end)s
    GROUP BY 1, 2
) AS a
