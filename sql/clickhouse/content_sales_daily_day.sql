-- One UTC day [start, end) of knowton.content_sales_daily: completed purchases per content and
-- currency, by purchase createdAt, from the mirrors read with FINAL (FINAL comes before WHERE, so a
-- stale version or a deleted row never counts).
-- Columns in the order of knowton.content_sales_daily. A purchase whose content is not (or no longer)
-- in the contents mirror still counts, with an empty creator, so revenue is never under-reported.
SELECT
    toDate(p.created_at, 'UTC')          AS date,
    p.content_id                         AS content_id,
    any(c.creator)                       AS creator,
    p.currency                           AS currency,
    toUInt64(count())                    AS sales_count,
    CAST(sum(p.amount) AS Decimal(38, 6)) AS revenue
FROM
(
    SELECT content_id, amount, currency, created_at
    FROM knowton.purchases FINAL
    WHERE is_deleted = 0 AND status = 'completed'
      AND created_at >= {start:DateTime64(6, 'UTC')} AND created_at < {end:DateTime64(6, 'UTC')}
) AS p
LEFT JOIN
(
    SELECT id, creator
    FROM knowton.contents FINAL
    WHERE is_deleted = 0
) AS c ON p.content_id = c.id
GROUP BY date, content_id, currency
