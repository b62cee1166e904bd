-- Staging twins of the daily aggregates (same structure, same PARTITION BY date). A day is computed
-- here first, then swapped into the real table with REPLACE PARTITION, so readers see either the old
-- day or the new one, never a half-written or doubled day. Only a day being recomputed lives here,
-- and only while it is.
-- The loader splits this file on semicolon-newline, so comments here stay free of semicolons.

CREATE TABLE IF NOT EXISTS knowton.user_activity_staging AS knowton.user_activity;

CREATE TABLE IF NOT EXISTS knowton.content_sales_daily_staging AS knowton.content_sales_daily;
