-- One UTC day [start, end) of knowton.user_activity, computed from the mirrors read with FINAL.
-- FINAL comes before WHERE, so a stale version or a deleted row never counts, and a row whose newest
-- version moved to another day or status counts only where the newest version says.
-- Columns in the order of knowton.user_activity. Rows with a zero count cannot occur: every row
-- comes from a GROUP BY over at least one mirror row.
SELECT date, user_address, action_type, action_count, total_value
FROM
(
    SELECT
        toDate(created_at, 'UTC')   AS date,
        address                     AS user_address,
        'registration'              AS action_type,
        toUInt64(count())           AS action_count,
        toDecimal128(0, 6)          AS total_value
    FROM knowton.users FINAL
    WHERE is_deleted = 0
      AND created_at >= {start:DateTime64(6, 'UTC')} AND created_at < {end:DateTime64(6, 'UTC')}
    GROUP BY date, user_address

    UNION ALL

    SELECT
        toDate(created_at, 'UTC'),
        creator,
        'content_created',
        toUInt64(count()),
        CAST(sum(price) AS Decimal(38, 6))
    FROM knowton.contents FINAL
    WHERE is_deleted = 0
      AND created_at >= {start:DateTime64(6, 'UTC')} AND created_at < {end:DateTime64(6, 'UTC')}
    GROUP BY toDate(created_at, 'UTC'), creator

    UNION ALL

    SELECT
        toDate(created_at, 'UTC'),
        buyer,
        'purchase',
        toUInt64(count()),
        CAST(sum(amount) AS Decimal(38, 6))
    FROM knowton.purchases FINAL
    WHERE is_deleted = 0 AND status = 'completed'
      AND created_at >= {start:DateTime64(6, 'UTC')} AND created_at < {end:DateTime64(6, 'UTC')}
    GROUP BY toDate(created_at, 'UTC'), buyer

    UNION ALL

    -- A sale is credited to the content's creator, so a purchase whose content is not (or no longer)
    -- in the contents mirror cannot be attributed and is left out here (content_sales_daily keeps it).
    SELECT
        toDate(p.created_at, 'UTC'),
        c.creator,
        'sale',
        toUInt64(count()),
        CAST(sum(p.amount) AS Decimal(38, 6))
    FROM
    (
        SELECT content_id, amount, created_at
        FROM knowton.purchases FINAL
        WHERE is_deleted = 0 AND status = 'completed'
          AND created_at >= {start:DateTime64(6, 'UTC')} AND created_at < {end:DateTime64(6, 'UTC')}
    ) AS p
    INNER JOIN
    (
        SELECT id, creator
        FROM knowton.contents FINAL
        WHERE is_deleted = 0
    ) AS c ON p.content_id = c.id
    GROUP BY toDate(p.created_at, 'UTC'), c.creator
)
