-- Canonical spellings of the column types whose canonical form PostgreSQL cannot write inline: jsonb and text[].
-- knowton_pipeline/lib/canonical.py composes them with inline expressions for the other types into the canonical
-- row string that reconciliation hashes, and spells the same thing in ClickHouse SQL and in Python.
-- Idempotent: CREATE OR REPLACE only.

CREATE SCHEMA IF NOT EXISTS ops;

-- The decimal value of the double nearest to a number: its shortest round-trip text (which needs
-- extra_float_digits >= 1, PostgreSQL's default, pinned here against sessions that lower it), read back as numeric.
CREATE OR REPLACE FUNCTION ops.canonical_json_double(value numeric) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET extra_float_digits = 1
AS $$
    SELECT trim_scale(value::float8::text::numeric)::text
$$;

-- A JSON number as the pipeline can carry it. A jsonb number with a fraction reaches Python as a float (psycopg
-- and the Debezium decoder both parse jsonb with json.loads), so it is first rounded to the nearest double; then
-- every number is written as its exact decimal value: plain digits, no exponent, no trailing fraction zeros, no
-- negative zero. 1.50 -> 1.5, 1e2 -> 100, 1.5e-7 -> 0.00000015, -0.0 -> 0. Integers (no fraction) stay exact.
-- Fractions a double cannot hold never raise (a raise would abort a whole segment's checksum): below the smallest
-- double they are 0, as in Python; beyond the largest they are 'Infinity', which Python never writes (it refuses
-- them), so such a row shows as different.
CREATE OR REPLACE FUNCTION ops.canonical_json_number(value numeric) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN scale(value) = 0 THEN value::text
        WHEN abs(value) < 2.4703282292062328e-324 THEN '0'
        WHEN value >= 1.7976931348623158e308 THEN 'Infinity'
        WHEN value <= -1.7976931348623158e308 THEN '-Infinity'
        ELSE ops.canonical_json_double(value)
    END
$$;

-- jsonb as canonical JSON text: object keys sorted by code point (COLLATE "C" compares UTF-8 bytes, which is the
-- same order), no whitespace, strings escaped as jsonb prints them (the same escapes as Python's json module with
-- ensure_ascii=False), numbers by ops.canonical_json_number. SQL NULL stays NULL; JSON null is 'null'.
-- PL/pgSQL keeps its plans between calls, and scalar members are spelled without recursing: ten times faster
-- than the same recursion as a SQL function.
CREATE OR REPLACE FUNCTION ops.canonical_jsonb(value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    CASE jsonb_typeof(value)
    WHEN 'object' THEN
        RETURN '{' || coalesce(
            (SELECT string_agg(
                        to_jsonb(e.key)::text || ':' ||
                        CASE WHEN jsonb_typeof(e.value) IN ('object', 'array')
                                  OR (jsonb_typeof(e.value) = 'number' AND scale(e.value::numeric) > 0)
                             THEN ops.canonical_jsonb(e.value)
                             ELSE e.value::text
                        END,
                        ',' ORDER BY e.key COLLATE "C")
             FROM jsonb_each(value) AS e),
            '') || '}';
    WHEN 'array' THEN
        RETURN '[' || coalesce(
            (SELECT string_agg(
                        CASE WHEN jsonb_typeof(a.value) IN ('object', 'array')
                                  OR (jsonb_typeof(a.value) = 'number' AND scale(a.value::numeric) > 0)
                             THEN ops.canonical_jsonb(a.value)
                             ELSE a.value::text
                        END,
                        ',' ORDER BY a.position)
             FROM jsonb_array_elements(value) WITH ORDINALITY AS a(value, position)),
            '') || ']';
    WHEN 'number' THEN
        RETURN ops.canonical_json_number(value::numeric);
    ELSE
        -- A string, true, false or null; an integer never reaches here from a container.
        RETURN value::text;
    END CASE;
END;
$$;

-- text[] as {"a","b,c"}: every element quoted, with backslash, double quote and tab escaped by a backslash, so
-- ['a,b'] and ['a', 'b'] differ and the result never holds a raw tab (the canonical row's column separator).
-- A NULL element (which the mirrors cannot hold) is an unquoted NULL, so it never looks like a real value.
CREATE OR REPLACE FUNCTION ops.canonical_text_array(value text[]) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT '{' || coalesce(
        (SELECT string_agg(
                    coalesce('"' || replace(replace(replace(u.item, E'\\', E'\\\\'), '"', E'\\"'), E'\t', E'\\t') || '"',
                             'NULL'),
                    ',' ORDER BY u.position)
         FROM unnest(value) WITH ORDINALITY AS u(item, position)),
        '') || '}'
$$;
