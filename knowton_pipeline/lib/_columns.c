/* A batch of usual Debezium change events of one table, read straight into Arrow buffers.
 *
 * `read_batch` is the compiled reading behind `debezium.read_change_columns`: it takes a batch only when every record
 * in it is one the msgspec reading of that function takes, and gives the same values; for anything else (a value it
 * cannot type, a field it does not expect, JSON it is not sure of) it returns None, and the batch is read the other
 * way. It never decides that a record is malformed: that is left to the readings in Python, which say why.
 *
 * What it accepts, record by record (all of it is checked; a record that breaks one rule makes the result None):
 *   - the value is one JSON object, with JSON whitespace around tokens at most;
 *   - `op` is "c", "u", "r" or "d"; `source` is an object with a positive 64-bit `lsn`, a non-negative integer
 *     `ts_ms`, `table` equal to the table's name and `sequence` a string or null (or absent);
 *   - a delete has `before` (an object) and no `after`; any other change has `after` (an object);
 *   - `after` holds every column, typed as the column is (text as a string, int and bigint as integers in range,
 *     bool as true or false), null only where the column is nullable; `before`, when it is an object, holds the key
 *     columns, typed the same way;
 *   - a Kafka key, when there is one, is an object holding the key columns, equal to the row's key;
 *   - every field it does not read is valid JSON (the syntax, escapes and surrogate pairs, as msgspec checks it);
 *   - strings it reads are valid UTF-8 after their escapes are decoded.
 * Field names with escapes, and a field it reads given twice, make the result None rather than be guessed at.
 *
 * The GIL is released while the records are read: nothing Python is touched until the buffers are handed back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

enum { KIND_TEXT = 0, KIND_INT32 = 1, KIND_INT64 = 2, KIND_BOOL = 3 };
enum { MAX_DEPTH = 64 };

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

/* One output column: validity bitmap, int32 offsets and bytes for text, values for the rest. */
typedef struct {
    int kind;
    int nullable;
    int is_key;
    unsigned char *validity;
    Py_ssize_t nulls;
    int32_t *offsets;
    Buf data; /* text bytes; int32/int64 values; bool bitmap */
} Column;

typedef struct {
    const char *start, *end; /* the value's bytes, or start NULL when the field is absent */
} Span;

typedef struct {
    const char *p, *end;
} Cursor;

static inline void ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* Eight bytes at a time: does the word hold a byte equal to `b`, or one below 0x20? */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline uint64_t load8(const void *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}
static inline uint64_t has_byte(uint64_t w, unsigned char b) {
    uint64_t v = w ^ (ONES * b);
    return (v - ONES) & ~v & HIGHS;
}
static inline uint64_t has_control(uint64_t w) { return (w - ONES * 0x20) & ~w & HIGHS; }

static int hex4(const char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9') v |= (uint32_t)(h - '0');
        else if (h >= 'a' && h <= 'f') v |= (uint32_t)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F') v |= (uint32_t)(h - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

/* Past the bytes of a string that need no look: not a quote, a backslash or a control character. */
static inline const char *plain_run(const char *p, const char *end) {
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x1f);
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                   _mm_cmpeq_epi8(_mm_max_epu8(v, space), space));
        int mask = _mm_movemask_epi8(hit);
        if (mask) return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (end - p >= 8) {
        uint64_t w = load8(p);
        if (has_byte(w, '"') | has_byte(w, '\\') | has_control(w)) break;
        p += 8;
    }
    return p;
}

/* Past a string whose opening quote is at c->p; 0 when it is not a JSON string msgspec takes. `escaped` tells
 * whether it holds a backslash. Raw bytes at or above 0x80 are not checked here (msgspec does not check the strings
 * it skips either); the strings that are read are checked when decoded. */
static int skip_string(Cursor *c, int *escaped) {
    const char *p = c->p + 1;
    int esc = 0;
    for (;;) {
        p = plain_run(p, c->end);
        if (p >= c->end) return 0;
        unsigned char ch = (unsigned char)*p;
        if (ch == '"') {
            c->p = p + 1;
            if (escaped) *escaped = esc;
            return 1;
        }
        if (ch < 0x20) return 0;
        if (ch == '\\') {
            esc = 1;
            if (p + 1 >= c->end) return 0;
            char e = p[1];
            if (e == 'u') { /* a surrogate only in a pair, high then low, as msgspec checks it everywhere */
                uint32_t unit, low;
                if (c->end - p < 6 || !hex4(p + 2, &unit)) return 0;
                p += 6;
                if (unit >= 0xDC00 && unit <= 0xDFFF) return 0;
                if (unit >= 0xD800 && unit <= 0xDBFF) {
                    if (c->end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &low)) return 0;
                    if (low < 0xDC00 || low > 0xDFFF) return 0;
                    p += 6;
                }
                continue;
            }
            if (e == '\0' || !strchr("\"\\/bfnrt", e)) return 0;
            p += 2;
            continue;
        }
        p++;
    }
}

static inline int is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* Past a JSON number; `integral` is set when it has no fraction and no exponent. */
static int skip_number(Cursor *c, int *integral) {
    const char *p = c->p;
    int whole = 1;
    if (p < c->end && *p == '-') p++;
    if (p >= c->end) return 0;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < c->end && is_digit(*p)) p++;
    } else {
        return 0;
    }
    if (p < c->end && *p == '.') {
        whole = 0;
        p++;
        if (p >= c->end || !is_digit(*p)) return 0;
        while (p < c->end && is_digit(*p)) p++;
    }
    if (p < c->end && (*p == 'e' || *p == 'E')) {
        whole = 0;
        p++;
        if (p < c->end && (*p == '+' || *p == '-')) p++;
        if (p >= c->end || !is_digit(*p)) return 0;
        while (p < c->end && is_digit(*p)) p++;
    }
    c->p = p;
    if (integral) *integral = whole;
    return 1;
}

static int skip_literal(Cursor *c, const char *word, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

static int skip_value(Cursor *c, int depth);

static int skip_container(Cursor *c, int depth, char close) {
    if (depth > MAX_DEPTH) return 0;
    c->p++;
    ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    for (;;) {
        if (close == '}') {
            if (c->p >= c->end || *c->p != '"' || !skip_string(c, NULL)) return 0;
            ws(c);
            if (c->p >= c->end || *c->p != ':') return 0;
            c->p++;
            ws(c);
        }
        if (!skip_value(c, depth + 1)) return 0;
        ws(c);
        if (c->p >= c->end) return 0;
        if (*c->p == ',') {
            c->p++;
            ws(c);
            continue;
        }
        if (*c->p == close) {
            c->p++;
            return 1;
        }
        return 0;
    }
}

static int skip_value(Cursor *c, int depth) {
    if (c->p >= c->end) return 0;
    switch (*c->p) {
    case '"': return skip_string(c, NULL);
    case '{': return skip_container(c, depth, '}');
    case '[': return skip_container(c, depth, ']');
    case 't': return skip_literal(c, "true", 4);
    case 'f': return skip_literal(c, "false", 5);
    case 'n': return skip_literal(c, "null", 4);
    default: return skip_number(c, NULL);
    }
}

/* An object's field name and its colon; 0 when malformed, or spelled with escapes (it could then be any of ours:
 * not guessed at). */
static int field_name(Cursor *c, const char **name, size_t *len) {
    if (c->p >= c->end || *c->p != '"') return 0;
    *name = c->p + 1;
    int escaped = 0;
    if (!skip_string(c, &escaped) || escaped) return 0;
    *len = (size_t)(c->p - 1 - *name);
    ws(c);
    if (c->p >= c->end || *c->p != ':') return 0;
    c->p++;
    ws(c);
    return 1;
}

/* After a field's value: 1 when another field follows, 2 at the object's end (consumed), 0 when malformed. */
static int after_field(Cursor *c) {
    ws(c);
    if (c->p >= c->end) return 0;
    if (*c->p == ',') {
        c->p++;
        ws(c);
        return 1;
    }
    if (*c->p == '}') {
        c->p++;
        return 2;
    }
    return 0;
}

/* An object's opening brace; 2 when the object is empty (consumed), 1 when fields follow, 0 when not an object. */
static int object_start(Cursor *c) {
    if (c->p >= c->end || *c->p != '{') return 0;
    c->p++;
    ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 2;
    }
    return 1;
}

/* Walk an object's fields: for each name equal to one of `names`, record its value's span (a name given twice, or a
 * name with an escape, makes it fail); skip the others. Returns 1 when the object is well formed. */
static int object_fields(Cursor *c, const char *const *names, const size_t *lens, size_t count, Span *spans) {
    for (size_t i = 0; i < count; i++) spans[i].start = NULL;
    int state = object_start(c);
    size_t next = 0; /* Debezium writes the fields in column order: try the one after the last match first */
    while (state == 1) {
        const char *name;
        size_t len;
        if (!field_name(c, &name, &len)) return 0;
        size_t found = count;
        if (next < count && lens[next] == len && memcmp(names[next], name, len) == 0) {
            found = next;
        } else {
            for (size_t i = 0; i < count; i++) {
                if (lens[i] == len && memcmp(names[i], name, len) == 0) {
                    found = i;
                    break;
                }
            }
        }
        const char *start = c->p;
        if (!skip_value(c, 1)) return 0;
        if (found < count) {
            if (spans[found].start) return 0; /* given twice */
            spans[found].start = start;
            spans[found].end = c->p;
            next = found + 1;
        }
        state = after_field(c);
    }
    return state == 2;
}

static inline int is_null(Span s) { return s.end - s.start == 4 && memcmp(s.start, "null", 4) == 0; }

/* A JSON integer (no fraction, no exponent) within [lo, hi]. */
static int parse_integer(Span s, int64_t lo, int64_t hi, int64_t *out) {
    Cursor c = {s.start, s.end};
    int integral = 0;
    if (!skip_number(&c, &integral) || c.p != s.end || !integral) return 0;
    const char *p = s.start;
    int negative = 0;
    if (*p == '-') {
        negative = 1;
        p++;
    }
    if (s.end - p > 19) return 0;
    uint64_t v = 0;
    for (; p < s.end; p++) {
        uint64_t d = (uint64_t)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    if (negative) {
        if (v > (uint64_t)INT64_MAX + 1) return 0;
        int64_t n = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
        if (n < lo) return 0;
        *out = n;
    } else {
        if (v > (uint64_t)INT64_MAX || (int64_t)v > hi || (int64_t)v < lo) return 0;
        *out = (int64_t)v;
    }
    return 1;
}


/* Length of the valid UTF-8 sequence at p (strict: no overlong forms, no surrogates, at most U+10FFFF), or 0. */
static size_t utf8_sequence(const unsigned char *p, const unsigned char *end) {
    unsigned char b = p[0];
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) {
        if (end - p >= 2 && (p[1] & 0xC0) == 0x80) return 2;
        return 0;
    }
    if (b >= 0xE0 && b <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (b == 0xE0 && p[1] < 0xA0) return 0;  /* overlong */
        if (b == 0xED && p[1] >= 0xA0) return 0; /* a surrogate */
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (b == 0xF0 && p[1] < 0x90) return 0; /* overlong */
        if (b == 0xF4 && p[1] >= 0x90) return 0; /* beyond U+10FFFF */
        return 4;
    }
    return 0;
}

static void put_utf8(char *o, size_t *n, uint32_t cp) {
    if (cp < 0x80) {
        o[(*n)++] = (char)cp;
    } else if (cp < 0x800) {
        o[(*n)++] = (char)(0xC0 | (cp >> 6));
        o[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        o[(*n)++] = (char)(0xE0 | (cp >> 12));
        o[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        o[(*n)++] = (char)(0xF0 | (cp >> 18));
        o[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        o[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* Append the decoded text of the JSON string in `s` to `out` (its length in `*written`); 0 when it is not a
 * string, or its text is not valid UTF-8 (a lone surrogate escape included). */
static int decode_string(Span s, Buf *out, size_t *written) {
    if (s.end - s.start < 2 || *s.start != '"') return 0;
    const unsigned char *p = (const unsigned char *)s.start + 1, *end = (const unsigned char *)s.end - 1;
    if (!buf_reserve(out, (size_t)(end - p))) return 0; /* decoding never lengthens a JSON string */
    char *o = out->p + out->len;
    size_t n = 0;
    while (p < end) {
#ifdef __SSE2__
        while (end - p >= 16) { /* plain ASCII, sixteen bytes at a time */
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            if (_mm_movemask_epi8(_mm_or_si128(v, _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))))) break;
            _mm_storeu_si128((__m128i *)(o + n), v);
            n += 16;
            p += 16;
        }
#endif
        while (end - p >= 8) { /* plain ASCII, eight bytes at a time */
            uint64_t w = load8(p);
            if ((w & HIGHS) | has_byte(w, '\\')) break;
            memcpy(o + n, p, 8);
            n += 8;
            p += 8;
        }
        if (p >= end) break;
        unsigned char b = *p;
        if (b == '\\') {
            unsigned char e = p[1];
            switch (e) {
            case '"': o[n++] = '"'; p += 2; continue;
            case '\\': o[n++] = '\\'; p += 2; continue;
            case '/': o[n++] = '/'; p += 2; continue;
            case 'b': o[n++] = '\b'; p += 2; continue;
            case 'f': o[n++] = '\f'; p += 2; continue;
            case 'n': o[n++] = '\n'; p += 2; continue;
            case 'r': o[n++] = '\r'; p += 2; continue;
            case 't': o[n++] = '\t'; p += 2; continue;
            case 'u': {
                uint32_t cp;
                if (end - p < 6 || !hex4((const char *)p + 2, &cp)) return 0;
                p += 6;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t low;
                    if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4((const char *)p + 2, &low)) return 0;
                    if (low < 0xDC00 || low > 0xDFFF) return 0;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    p += 6;
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return 0;
                }
                put_utf8(o, &n, cp);
                continue;
            }
            default: return 0;
            }
        }
        if (b < 0x80) {
            o[n++] = (char)b;
            p++;
            continue;
        }
        size_t k = utf8_sequence(p, end);
        if (!k) return 0;
        memcpy(o + n, p, k);
        n += k;
        p += k;
    }
    out->len += n;
    *written = n;
    return 1;
}

static inline void set_bit(unsigned char *bits, Py_ssize_t i) { bits[i >> 3] |= (unsigned char)(1u << (i & 7)); }

/* Append the value in `s` (a span, or NULL start for a null written by a delete) to column `col` at row `i`. */
static int put_value(Column *col, Py_ssize_t i, Span s, int may_be_null) {
    if (s.start == NULL || is_null(s)) {
        if (s.start != NULL && !col->nullable && !may_be_null) return 0;
        col->nulls++;
        if (col->kind == KIND_TEXT) col->offsets[i + 1] = col->offsets[i];
        return 1;
    }
    set_bit(col->validity, i);
    int64_t v;
    switch (col->kind) {
    case KIND_TEXT: {
        size_t n;
        if (!decode_string(s, &col->data, &n)) return 0;
        int64_t next = (int64_t)col->offsets[i] + (int64_t)n;
        if (next > INT32_MAX) return 0;
        col->offsets[i + 1] = (int32_t)next;
        return 1;
    }
    case KIND_INT32:
        if (!parse_integer(s, INT32_MIN, INT32_MAX, &v)) return 0;
        ((int32_t *)col->data.p)[i] = (int32_t)v;
        return 1;
    case KIND_INT64:
        if (!parse_integer(s, INT64_MIN, INT64_MAX, &v)) return 0;
        ((int64_t *)col->data.p)[i] = v;
        return 1;
    case KIND_BOOL:
        if (s.end - s.start == 4 && memcmp(s.start, "true", 4) == 0) {
            set_bit((unsigned char *)col->data.p, i);
            return 1;
        }
        return s.end - s.start == 5 && memcmp(s.start, "false", 5) == 0;
    }
    return 0;
}

/* Is the key column value in `given` (a span in a Kafka key) equal to the value just put at row `i`? */
static int same_key_value(Column *col, Py_ssize_t i, Span given, Buf *scratch) {
    if (given.start == NULL || is_null(given)) return 0; /* a key column the row holds is never null here */
    int64_t v;
    switch (col->kind) {
    case KIND_TEXT: {
        size_t n;
        scratch->len = 0;
        if (!decode_string(given, scratch, &n)) return 0;
        size_t have = (size_t)(col->offsets[i + 1] - col->offsets[i]);
        return n == have && memcmp(scratch->p, col->data.p + col->offsets[i], n) == 0;
    }
    case KIND_INT32:
        return parse_integer(given, INT32_MIN, INT32_MAX, &v) && ((int32_t *)col->data.p)[i] == (int32_t)v;
    case KIND_INT64:
        return parse_integer(given, INT64_MIN, INT64_MAX, &v) && ((int64_t *)col->data.p)[i] == v;
    }
    return 0; /* bool keys are not read here */
}

/* Is `s` a value the key column `col` takes (present, typed as the column, null only where it is nullable)? */
static int key_value_valid(Column *col, Span s, Buf *scratch) {
    int64_t v;
    size_t n;
    if (!s.start) return 0;
    if (is_null(s)) return col->nullable;
    switch (col->kind) {
    case KIND_TEXT: scratch->len = 0; return decode_string(s, scratch, &n);
    case KIND_INT32: return parse_integer(s, INT32_MIN, INT32_MAX, &v);
    case KIND_INT64: return parse_integer(s, INT64_MIN, INT64_MAX, &v);
    }
    return 0;
}

typedef struct {
    Py_ssize_t n;
    size_t ncols;
    Column *cols;
    const char **names;
    size_t *lens;
    const char **key_names;
    size_t *key_lens;
    size_t *key_cols; /* the column of each key column */
    size_t nkeys;
    const char *table;
    size_t table_len;
    /* per record */
    char *ops;
    int64_t *lsns;
    Column sequence;
} Batch;

static const char *const SOURCE[] = {"lsn", "table", "ts_ms", "sequence"};
static const size_t SOURCE_LENS[] = {3, 5, 5, 8};

/* What a record's envelope holds, read in one walk: `op`'s span, the fields of `source` read, and whether `before`
 * and `after` are absent (0), null (1) or objects (2), whose fields are read in place (the old image for its key
 * columns, the new one for every column). */
typedef struct {
    Span op;
    Span source[4];
    int has_source, before, after;
} Envelope;

static int image_or_null(Cursor *c, const char *const *names, const size_t *lens, size_t count, Span *spans,
                         int *state) {
    if (*state) return 0; /* given twice */
    if (c->p < c->end && *c->p == '{') {
        *state = 2;
        return object_fields(c, names, lens, count, spans);
    }
    *state = 1;
    return skip_literal(c, "null", 4); /* any other value is refused by msgspec as well */
}

static int read_envelope(Cursor *c, Batch *b, Envelope *e, Span *old_key, Span *row) {
    memset(e, 0, sizeof(*e));
    ws(c);
    int state = object_start(c);
    while (state == 1) {
        const char *name;
        size_t len;
        if (!field_name(c, &name, &len)) return 0;
        if (len == 2 && memcmp(name, "op", 2) == 0) {
            if (e->op.start) return 0;
            e->op.start = c->p;
            if (!skip_value(c, 1)) return 0;
            e->op.end = c->p;
        } else if (len == 6 && memcmp(name, "source", 6) == 0) {
            if (e->has_source || c->p >= c->end || *c->p != '{') return 0;
            e->has_source = 1;
            if (!object_fields(c, SOURCE, SOURCE_LENS, 4, e->source)) return 0;
        } else if (len == 6 && memcmp(name, "before", 6) == 0) {
            if (!image_or_null(c, b->key_names, b->key_lens, b->nkeys, old_key, &e->before)) return 0;
        } else if (len == 5 && memcmp(name, "after", 5) == 0) {
            if (!image_or_null(c, b->names, b->lens, b->ncols, row, &e->after)) return 0;
        } else if (!skip_value(c, 1)) {
            return 0;
        }
        state = after_field(c);
    }
    if (state != 2) return 0;
    ws(c);
    return c->p == c->end; /* nothing after the object but whitespace */
}

/* Read record i into the batch; 0 when it is not a usual change. */
static int read_record(Batch *b, Py_ssize_t i, const char *value, Py_ssize_t size, const char *key, Py_ssize_t key_size,
                       Span *spans, Span *old_key, Span *key_spans, Buf *scratch) {
    Cursor c = {value, value + size};
    Envelope e;
    if (!read_envelope(&c, b, &e, old_key, spans)) return 0;
    /* op */
    if (!e.op.start || e.op.end - e.op.start != 3 || e.op.start[0] != '"' || e.op.start[2] != '"') return 0;
    char op = e.op.start[1];
    if (op != 'c' && op != 'u' && op != 'r' && op != 'd') return 0;
    b->ops[i] = op;
    /* source */
    if (!e.has_source) return 0;
    const Span *src = e.source;
    int64_t lsn, ts_ms;
    if (!src[0].start || !parse_integer(src[0], 1, INT64_MAX, &lsn)) return 0;
    if (!src[2].start || !parse_integer(src[2], 0, INT64_MAX, &ts_ms)) return 0;
    if (!src[1].start) return 0;
    {
        scratch->len = 0;
        size_t n;
        if (!decode_string(src[1], scratch, &n) || n != b->table_len || memcmp(scratch->p, b->table, n) != 0) return 0;
    }
    b->lsns[i] = lsn;
    if (!put_value(&b->sequence, i, src[3], 1)) return 0; /* absent or null: no sequence */
    /* images: `before` is read for its key columns (and must hold them when it is an object) */
    if (op == 'd' ? (e.after == 2 || e.before != 2) : e.after != 2) return 0;
    if (e.before == 2) {
        for (size_t k = 0; k < b->nkeys; k++) /* the old image's key is typed as the new one's */
            if (!key_value_valid(&b->cols[b->key_cols[k]], old_key[k], scratch)) return 0;
    }
    if (op == 'd') {
        /* A delete leaves its key, from its old image; its other columns are null. */
        Span none = {NULL, NULL};
        for (size_t j = 0; j < b->ncols; j++)
            if (!b->cols[j].is_key && !put_value(&b->cols[j], i, none, 1)) return 0;
        for (size_t k = 0; k < b->nkeys; k++)
            if (!put_value(&b->cols[b->key_cols[k]], i, old_key[k], 0)) return 0;
    } else {
        for (size_t j = 0; j < b->ncols; j++) {
            if (!spans[j].start) return 0; /* a column missing from the image */
            if (!put_value(&b->cols[j], i, spans[j], 0)) return 0;
        }
    }
    /* the Kafka key */
    if (key) {
        Cursor kc = {key, key + key_size};
        ws(&kc);
        if (kc.p >= kc.end || *kc.p != '{') return 0;
        if (!object_fields(&kc, b->key_names, b->key_lens, b->nkeys, key_spans)) return 0;
        ws(&kc);
        if (kc.p != kc.end) return 0;
        for (size_t k = 0; k < b->nkeys; k++) {
            Column *col = &b->cols[b->key_cols[k]];
            if (!((col->validity[i >> 3] >> (i & 7)) & 1)) return 0; /* a null key: compared the other way */
            if (!same_key_value(col, i, key_spans[k], scratch)) return 0;
        }
    }
    return 1;
}

static int column_init(Column *col, Py_ssize_t n) {
    size_t bits = (size_t)(n + 8) / 8;
    col->validity = calloc(bits, 1);
    col->nulls = 0;
    col->offsets = NULL;
    memset(&col->data, 0, sizeof(col->data));
    if (!col->validity) return 0;
    if (col->kind == KIND_TEXT) {
        col->offsets = calloc((size_t)n + 1, sizeof(int32_t));
        return col->offsets != NULL;
    }
    size_t width = col->kind == KIND_INT32 ? 4 : col->kind == KIND_INT64 ? 8 : 0;
    size_t size = width ? width * (size_t)n : bits;
    if (!buf_reserve(&col->data, size ? size : 1)) return 0;
    memset(col->data.p, 0, size ? size : 1);
    col->data.len = size;
    return 1;
}

static void column_free(Column *col) {
    free(col->validity);
    free(col->offsets);
    free(col->data.p);
}

static PyObject *column_result(Column *col, Py_ssize_t n) {
    size_t bits = (size_t)(n + 7) / 8;
    PyObject *validity = PyBytes_FromStringAndSize((const char *)col->validity, (Py_ssize_t)bits);
    PyObject *offsets = col->kind == KIND_TEXT
                            ? PyBytes_FromStringAndSize((const char *)col->offsets, (Py_ssize_t)((n + 1) * 4))
                            : (Py_INCREF(Py_None), Py_None);
    PyObject *data = PyBytes_FromStringAndSize(col->data.p ? col->data.p : "", (Py_ssize_t)col->data.len);
    if (!validity || !offsets || !data) {
        Py_XDECREF(validity);
        Py_XDECREF(offsets);
        Py_XDECREF(data);
        return NULL;
    }
    return Py_BuildValue("(NnNN)", validity, col->nulls, offsets, data);
}

/* read_batch(values, keys, table, columns, key_columns)
 *   values: list of bytes; keys: list of bytes or None, as long; table: the table's name (bytes);
 *   columns: sequence of (name: bytes, kind: int, nullable: bool); key_columns: sequence of column positions.
 * Returns None, or (ops: bytes, lsns: bytes of int64, sequence: column, columns: list of column), a column being
 * (validity bitmap: bytes, null count, int32 offsets: bytes or None, data: bytes). */
static PyObject *read_batch(PyObject *self, PyObject *args) {
    PyObject *values, *keys, *columns, *key_columns;
    const char *table;
    Py_ssize_t table_len;
    if (!PyArg_ParseTuple(args, "O!O!y#OO", &PyList_Type, &values, &PyList_Type, &keys, &table, &table_len, &columns,
                          &key_columns))
        return NULL;
    /* Tuples of the records: they hold the bytes read while the GIL is released, whatever happens to the lists. */
    values = PyList_AsTuple(values);
    if (!values) return NULL;
    keys = PyList_AsTuple(keys);
    if (!keys) {
        Py_DECREF(values);
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *cols_seq = NULL, *keys_seq = NULL, *result = NULL;
    if (PyTuple_GET_SIZE(keys) != n) {
        PyErr_SetString(PyExc_ValueError, "values and keys differ in length");
        goto early;
    }
    cols_seq = PySequence_Fast(columns, "columns must be a sequence");
    if (!cols_seq) goto early;
    keys_seq = PySequence_Fast(key_columns, "key_columns must be a sequence");
    if (!keys_seq) goto early;
    size_t ncols = (size_t)PySequence_Fast_GET_SIZE(cols_seq), nkeys = (size_t)PySequence_Fast_GET_SIZE(keys_seq);
    Batch b;
    memset(&b, 0, sizeof(b));
    const char **data = NULL, **kdata = NULL;
    Py_ssize_t *sizes = NULL, *ksizes = NULL;
    Span *spans = NULL, *key_spans = NULL, *old_key = NULL;
    Buf scratch = {0};
    int ok = 0;
    if (ncols == 0 || nkeys == 0 || nkeys > ncols) {
        PyErr_SetString(PyExc_ValueError, "a table with columns and a key is needed");
        goto done;
    }
    b.n = n;
    b.ncols = ncols;
    b.nkeys = nkeys;
    b.table = table;
    b.table_len = (size_t)table_len;
    b.cols = calloc(ncols, sizeof(Column));
    b.names = calloc(ncols, sizeof(char *));
    b.lens = calloc(ncols, sizeof(size_t));
    b.key_names = calloc(nkeys, sizeof(char *));
    b.key_lens = calloc(nkeys, sizeof(size_t));
    b.key_cols = calloc(nkeys, sizeof(size_t));
    b.ops = malloc((size_t)n + 1);
    b.lsns = calloc((size_t)n + 1, sizeof(int64_t));
    spans = calloc(ncols, sizeof(Span));
    key_spans = calloc(nkeys, sizeof(Span));
    old_key = calloc(nkeys, sizeof(Span));
    data = calloc((size_t)n + 1, sizeof(char *));
    sizes = calloc((size_t)n + 1, sizeof(Py_ssize_t));
    kdata = calloc((size_t)n + 1, sizeof(char *));
    ksizes = calloc((size_t)n + 1, sizeof(Py_ssize_t));
    if (!b.cols || !b.names || !b.lens || !b.key_names || !b.key_lens || !b.key_cols || !b.ops || !b.lsns || !spans ||
        !key_spans || !old_key || !data || !sizes || !kdata || !ksizes) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t j = 0; j < ncols; j++) {
        PyObject *spec = PySequence_Fast_GET_ITEM(cols_seq, j);
        const char *name;
        Py_ssize_t name_len;
        int kind, nullable;
        if (!PyArg_ParseTuple(spec, "y#ip", &name, &name_len, &kind, &nullable)) goto done;
        if (kind < KIND_TEXT || kind > KIND_BOOL) {
            PyErr_SetString(PyExc_ValueError, "unknown column kind");
            goto done;
        }
        b.cols[j].kind = kind;
        b.cols[j].nullable = nullable;
        b.names[j] = name;
        b.lens[j] = (size_t)name_len;
    }
    for (size_t k = 0; k < nkeys; k++) {
        Py_ssize_t pos = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(keys_seq, k));
        if (pos == -1 && PyErr_Occurred()) goto done;
        if (pos < 0 || (size_t)pos >= ncols || b.cols[pos].kind == KIND_BOOL) {
            PyErr_SetString(PyExc_ValueError, "a key column must be a text or integer column of the table");
            goto done;
        }
        b.key_cols[k] = (size_t)pos;
        b.key_names[k] = b.names[pos];
        b.key_lens[k] = b.lens[pos];
        b.cols[pos].is_key = 1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(values, i), *k = PyTuple_GET_ITEM(keys, i);
        if (!PyBytes_Check(v) || (k != Py_None && !PyBytes_Check(k))) {
            PyErr_SetString(PyExc_TypeError, "values must be bytes, keys bytes or None");
            goto done;
        }
        data[i] = PyBytes_AS_STRING(v);
        sizes[i] = PyBytes_GET_SIZE(v);
        kdata[i] = k == Py_None ? NULL : PyBytes_AS_STRING(k);
        ksizes[i] = k == Py_None ? 0 : PyBytes_GET_SIZE(k);
    }
    for (size_t j = 0; j < ncols; j++) {
        if (!column_init(&b.cols[j], n)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    b.sequence.kind = KIND_TEXT;
    b.sequence.nullable = 1;
    if (!column_init(&b.sequence, n)) {
        PyErr_NoMemory();
        goto done;
    }
    /* The lists hold their bytes, and nothing else runs in this module while the GIL is released. */
    Py_BEGIN_ALLOW_THREADS
    ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++)
        ok = read_record(&b, i, data[i], sizes[i], kdata[i], ksizes[i], spans, old_key, key_spans, &scratch);
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    {
        PyObject *cols_out = PyList_New((Py_ssize_t)ncols);
        if (!cols_out) goto done;
        for (size_t j = 0; j < ncols; j++) {
            PyObject *col = column_result(&b.cols[j], n);
            if (!col) {
                Py_DECREF(cols_out);
                goto done;
            }
            PyList_SET_ITEM(cols_out, (Py_ssize_t)j, col);
        }
        PyObject *sequence = column_result(&b.sequence, n);
        if (!sequence) {
            Py_DECREF(cols_out);
            goto done;
        }
        result = Py_BuildValue("(y#y#NN)", b.ops, n, (const char *)b.lsns, n * 8, sequence, cols_out);
    }
done:
    if (b.cols) {
        for (size_t j = 0; j < ncols; j++) column_free(&b.cols[j]);
    }
    column_free(&b.sequence);
    free(b.cols);
    free(b.names);
    free(b.lens);
    free(b.key_names);
    free(b.key_lens);
    free(b.key_cols);
    free(b.ops);
    free(b.lsns);
    free(spans);
    free(key_spans);
    free(old_key);
    free(data);
    free(sizes);
    free(kdata);
    free(ksizes);
    free(scratch.p);
early:
    Py_XDECREF(cols_seq);
    Py_XDECREF(keys_seq);
    Py_DECREF(values);
    Py_DECREF(keys);
    return result;
}

static PyMethodDef METHODS[] = {
    {"read_batch", read_batch, METH_VARARGS, "Read a batch of usual Debezium change events into Arrow buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_columns", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__columns(void) { return PyModule_Create(&MODULE); }
