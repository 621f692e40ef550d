/* Compiled twin of engine/esl/protocol.py's framer (EslParser) and decode_value.
 *
 * The Python module is the specification: this file reproduces its frames, its errors
 * (same messages, raised through the same Python helpers) and its `buffered` counts, and
 * tests/test_esl_protocol.py runs the same differential tests against both. Python objects
 * are made only for what a frame carries (header names and values, the body); the search
 * for the end of a header block, the line splitting and the Content-Length arithmetic work
 * on the bytes.
 *
 * protocol.py calls setup() once with the helpers this file must not duplicate: the Frame
 * factory, ProtocolError, the bad-line error builder, the Python Content-Length check (used
 * for every value that is not a short run of ASCII digits within the limit, so that each
 * error message is built in one place) and the Python decode_value (for non-ASCII text).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *frame_factory;   /* _frame(headers, body, content_type) -> Frame */
static PyObject *protocol_error;  /* ProtocolError */
static PyObject *bad_line;        /* _bad_line(line: str) -> ProtocolError */
static PyObject *content_length;  /* _content_length(value: str, limit: int) -> int, or raises */
static PyObject *py_decode_value; /* the pure-Python decode_value */
static PyObject *str_content_length; /* "Content-Length" */
static PyObject *str_content_type;   /* "Content-Type" */
static PyObject *str_empty;          /* "" */
static PyObject *str_frames;         /* "frames" */
static PyObject *str_undef;          /* "_undef_" */

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_header_bytes;
    Py_ssize_t max_body_bytes;
    char *buf;              /* the unfinished frame */
    Py_ssize_t len;
    Py_ssize_t cap;
    Py_ssize_t scan;        /* where to resume looking for the end of the header block */
    PyObject *headers;      /* parsed block (a mappingproxy) waiting for its body, or NULL */
    PyObject *content_type; /* its Content-Type (a str) while headers is set */
    Py_ssize_t body_start;
    Py_ssize_t body_len;
    PyObject *error;        /* the ProtocolError that made the parser unusable, or NULL */
    int feeding;            /* inside feed(): Python code it calls must not re-enter it */
} Parser;

static int
raise_error_object(PyObject *exc)
{
    if (exc == NULL)
        return -1;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return -1;
}

static int
raise_protocol_error(PyObject *message)
{
    if (message == NULL)
        return -1;
    PyObject *exc = PyObject_CallOneArg(protocol_error, message);
    Py_DECREF(message);
    return raise_error_object(exc);
}

static PyObject *
decode(const char *p, Py_ssize_t n)
{
    return PyUnicode_DecodeUTF8(p, n, "replace");
}

/* --------------------------------------------------------------------- header lines */

/* `Name: value` lines -> dict, as _parse_lines_slowly defines them: lines split at \n,
 * an empty line or a lone CR skipped, the name ends at the first ": ", the value loses one
 * trailing CR, the first of two same-named headers wins. Decoding each name and value on
 * its own gives the same text as decoding the block: \n, ':', ' ' and \r are ASCII and
 * end any invalid UTF-8 sequence before them. */
static PyObject *
parse_lines(const char *p, Py_ssize_t n)
{
    PyObject *headers = PyDict_New();
    if (headers == NULL)
        return NULL;
    const char *end = p + n;
    const char *line = p;
    for (;;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *stop = nl ? nl : end;
        Py_ssize_t size = stop - line;
        if (size == 0 || (size == 1 && line[0] == '\r'))
            goto next;
        const char *sep = NULL;
        for (const char *c = line; c + 1 < stop; c++) {
            c = memchr(c, ':', (size_t)(stop - 1 - c));
            if (c == NULL)
                break;
            if (c[1] == ' ') {
                sep = c;
                break;
            }
        }
        if (sep == NULL || sep == line) {
            PyObject *text = decode(line, size);
            if (text == NULL)
                goto fail;
            PyObject *exc = PyObject_CallOneArg(bad_line, text);
            Py_DECREF(text);
            raise_error_object(exc);
            goto fail;
        }
        const char *value = sep + 2;
        const char *value_end = (stop > value && stop[-1] == '\r') ? stop - 1 : stop;
        PyObject *name_obj = decode(line, sep - line);
        if (name_obj == NULL)
            goto fail;
        PyObject *value_obj = decode(value, value_end - value);
        if (value_obj == NULL) {
            Py_DECREF(name_obj);
            goto fail;
        }
        PyObject *kept = PyDict_SetDefault(headers, name_obj, value_obj);
        Py_DECREF(name_obj);
        Py_DECREF(value_obj);
        if (kept == NULL)
            goto fail;
    next:
        if (nl == NULL)
            break;
        line = nl + 1;
    }
    return headers;
fail:
    Py_DECREF(headers);
    return NULL;
}

/* Content-Length as a byte count: the usual short decimal inline, anything else (and every
 * error) through the Python check. */
static int
body_length(PyObject *value, Py_ssize_t limit, Py_ssize_t *out)
{
    if (PyUnicode_IS_ASCII(value)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(value);
        const char *s = (const char *)PyUnicode_DATA(value);
        if (n >= 1 && n <= 18) {
            Py_ssize_t length = 0;
            Py_ssize_t i = 0;
            for (; i < n && s[i] >= '0' && s[i] <= '9'; i++)
                length = length * 10 + (s[i] - '0');
            if (i == n && length <= limit) {
                *out = length;
                return 0;
            }
        }
    }
    PyObject *limit_obj = PyLong_FromSsize_t(limit);
    if (limit_obj == NULL)
        return -1;
    PyObject *result = PyObject_CallFunctionObjArgs(content_length, value, limit_obj, NULL);
    Py_DECREF(limit_obj);
    if (result == NULL)
        return -1;
    Py_ssize_t length = PyLong_AsSsize_t(result);
    Py_DECREF(result);
    if (length == -1 && PyErr_Occurred())
        return -1;
    *out = length;
    return 0;
}

/* --------------------------------------------------------------------- the framer */

static Py_ssize_t
skip_blank_lines(const char *p, Py_ssize_t n, Py_ssize_t pos)
{
    for (;;) {
        if (pos < n && p[pos] == '\n')
            pos += 1;
        else if (pos + 1 < n && p[pos] == '\r' && p[pos + 1] == '\n')
            pos += 2;
        else
            return pos;
    }
}

/* 1 when the header block starting at `start` is complete (and parsed), 0 when more bytes
 * are needed, -1 on error. */
static int
read_header_block(Parser *self, const char *p, Py_ssize_t n, Py_ssize_t start)
{
    Py_ssize_t pos = self->scan > start ? self->scan : start;
    Py_ssize_t block_end = -1, body_start = 0;
    while (pos < n) {
        const char *nl = memchr(p + pos, '\n', (size_t)(n - pos));
        if (nl == NULL)
            break;
        Py_ssize_t i = nl - p;
        if (i + 1 < n && p[i + 1] == '\n') {
            block_end = i;
            body_start = i + 2;
            break;
        }
        if (i + 2 < n && p[i + 1] == '\r' && p[i + 2] == '\n') {
            block_end = i;
            body_start = i + 3;
            break;
        }
        pos = i + 1;
    }
    if (block_end < 0) {
        if (n - start > self->max_header_bytes)
            return raise_protocol_error(
                PyUnicode_FromFormat("header block exceeds %zd bytes", self->max_header_bytes));
        self->scan = n - 2 > start ? n - 2 : start; /* the terminator may straddle two reads */
        return 0;
    }
    if (body_start - start > self->max_header_bytes)
        return raise_protocol_error(
            PyUnicode_FromFormat("header block exceeds %zd bytes", self->max_header_bytes));
    PyObject *headers = parse_lines(p + start, block_end - start);
    if (headers == NULL)
        return -1;
    Py_ssize_t length = 0;
    PyObject *cl = PyDict_GetItemWithError(headers, str_content_length);
    if (cl == NULL && PyErr_Occurred())
        goto fail;
    if (cl != NULL && body_length(cl, self->max_body_bytes, &length) < 0)
        goto fail;
    PyObject *ct = PyDict_GetItemWithError(headers, str_content_type);
    if (ct == NULL && PyErr_Occurred())
        goto fail;
    PyObject *proxy = PyDictProxy_New(headers);
    if (proxy == NULL)
        goto fail;
    Py_DECREF(headers);
    self->headers = proxy;
    self->content_type = Py_NewRef(ct != NULL ? ct : str_empty);
    self->body_len = length;
    self->body_start = body_start;
    self->scan = 0;
    return 1;
fail:
    Py_DECREF(headers);
    return -1;
}

/* Append the frames complete in p[0:n] to `frames`; *start ends where the unfinished frame
 * begins (also on error: `buffered` then counts the same bytes as the Python parser's). */
static int
cut_frames(Parser *self, const char *p, Py_ssize_t n, PyObject *frames, Py_ssize_t *start_out)
{
    Py_ssize_t start = 0;
    int status = 0;
    for (;;) {
        if (self->headers == NULL) {
            if (start < n && (p[start] == '\r' || p[start] == '\n'))
                start = skip_blank_lines(p, n, start);
            int got = read_header_block(self, p, n, start);
            if (got <= 0) {
                status = got;
                break;
            }
        }
        Py_ssize_t end = self->body_start + self->body_len;
        if (n < end)
            break;
        PyObject *body = PyBytes_FromStringAndSize(p + self->body_start, self->body_len);
        if (body == NULL) {
            status = -1;
            break;
        }
        PyObject *frame = PyObject_CallFunctionObjArgs(
            frame_factory, self->headers, body, self->content_type, NULL);
        Py_DECREF(body);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            status = -1;
            break;
        }
        Py_DECREF(frame);
        Py_CLEAR(self->headers);
        Py_CLEAR(self->content_type);
        start = end;
    }
    *start_out = start;
    return status;
}

static int
reserve(Parser *self, Py_ssize_t needed)
{
    if (needed <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap : 4096;
    while (cap < needed) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            cap = needed;
            break;
        }
        cap *= 2;
    }
    char *grown = PyMem_Realloc(self->buf, (size_t)cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = grown;
    self->cap = cap;
    return 0;
}

/* Leave p[start:n] (the unfinished frame) in the internal buffer; positions kept between
 * feeds are relative to the buffer's start. */
static int
keep(Parser *self, const char *p, Py_ssize_t n, Py_ssize_t start)
{
    if (p == self->buf) {
        if (start > 0) {
            memmove(self->buf, self->buf + start, (size_t)(n - start));
            self->len = n - start;
        }
    }
    else if (n > start) {
        if (reserve(self, n - start) < 0)
            return -1;
        memcpy(self->buf, p + start, (size_t)(n - start));
        self->len = n - start;
    }
    if (self->headers == NULL)
        self->scan = self->scan - start > 0 ? self->scan - start : 0;
    else
        self->body_start -= start;
    return 0;
}

static PyObject *
Parser_feed(Parser *self, PyObject *data)
{
    if (self->error != NULL) {
        raise_protocol_error(
            PyUnicode_FromFormat("parser unusable after an earlier error: %S", self->error));
        return NULL;
    }
    if (self->feeding) { /* e.g. from a __del__ run by the collector while a frame is made */
        PyErr_SetString(PyExc_RuntimeError, "EslParser.feed() re-entered");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    self->feeding = 1;
    const char *p;
    Py_ssize_t n;
    if (self->len > 0) {
        if (reserve(self, self->len + view.len) < 0) {
            self->feeding = 0;
            PyBuffer_Release(&view);
            Py_DECREF(frames);
            return NULL;
        }
        memcpy(self->buf + self->len, view.buf, (size_t)view.len);
        self->len += view.len;
        p = self->buf;
        n = self->len;
    }
    else { /* nothing buffered: frames are cut straight from the bytes fed */
        p = view.buf;
        n = view.len;
    }
    Py_ssize_t start = 0;
    int status = cut_frames(self, p, n, frames, &start);
    self->feeding = 0;
    if (status < 0) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (keep(self, p, n, start) < 0)
            PyErr_Clear();
        PyBuffer_Release(&view);
        PyErr_NormalizeException(&type, &value, &traceback);
        if (value != NULL && PyObject_IsInstance(value, protocol_error) == 1) {
            if (PyObject_SetAttr(value, str_frames, frames) < 0)
                PyErr_Clear();
            Py_XSETREF(self->error, Py_NewRef(value));
        }
        Py_DECREF(frames);
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    int kept = keep(self, p, n, start);
    PyBuffer_Release(&view);
    if (kept < 0) {
        Py_DECREF(frames);
        return NULL;
    }
    return frames;
}

static int
Parser_init(Parser *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"max_header_bytes", "max_body_bytes", NULL};
    if (frame_factory == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "import engine.esl.protocol first (it calls setup())");
        return -1;
    }
    Py_ssize_t max_header = 256 * 1024, max_body = 1024 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nn:EslParser", names, &max_header, &max_body))
        return -1;
    self->max_header_bytes = max_header;
    self->max_body_bytes = max_body;
    self->len = 0;
    self->scan = 0;
    self->body_start = 0;
    self->body_len = 0;
    Py_CLEAR(self->headers);
    Py_CLEAR(self->content_type);
    Py_CLEAR(self->error);
    return 0;
}

static int
Parser_traverse(Parser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->headers);
    Py_VISIT(self->content_type);
    Py_VISIT(self->error);
    return 0;
}

static int
Parser_clear(Parser *self)
{
    Py_CLEAR(self->headers);
    Py_CLEAR(self->content_type);
    Py_CLEAR(self->error);
    return 0;
}

static void
Parser_dealloc(Parser *self)
{
    PyObject_GC_UnTrack(self);
    Parser_clear(self);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Parser_buffered(Parser *self, void *closure)
{
    return PyLong_FromSsize_t(self->len);
}

static PyObject *
Parser_scan(Parser *self, void *closure)
{
    return PyLong_FromSsize_t(self->scan);
}

static PyMethodDef Parser_methods[] = {
    {"feed", (PyCFunction)Parser_feed, METH_O, "Bytes in, the frames they complete out."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Parser_getset[] = {
    {"buffered", (getter)Parser_buffered, NULL,
     "Bytes received but not yet returned in a frame (0 at a frame boundary).", NULL},
    {"_scan", (getter)Parser_scan, NULL, "Where the search for the block's end resumes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine.esl._speedups.EslParser",
    .tp_doc = "Incremental frame parser for the FreeSWITCH -> client direction (compiled).",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_traverse = (traverseproc)Parser_traverse,
    .tp_clear = (inquiry)Parser_clear,
    .tp_methods = Parser_methods,
    .tp_getset = Parser_getset,
};

/* --------------------------------------------------------------------- values */

static int
hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* decode_value for ASCII text (every value FreeSWITCH serializes): %XX (either case) becomes
 * the byte, any other '%' stays, and the bytes are read as UTF-8 with replacement, as
 * urllib.parse.unquote does. Other text goes to the Python function. */
static PyObject *
decode_value(PyObject *module, PyObject *raw)
{
    if (!PyUnicode_Check(raw) || !PyUnicode_IS_ASCII(raw))
        return PyObject_CallOneArg(py_decode_value, raw);
    Py_ssize_t n = PyUnicode_GET_LENGTH(raw);
    const unsigned char *s = (const unsigned char *)PyUnicode_DATA(raw);
    const unsigned char *percent = memchr(s, '%', (size_t)n);
    if (percent == NULL) {
        if (n == 7 && memcmp(s, "_undef_", 7) == 0)
            return Py_NewRef(str_empty);
        return Py_NewRef(raw);
    }
    char small[256];
    char *out = n <= (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)n);
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t done = percent - s;
    memcpy(out, s, (size_t)done);
    Py_ssize_t w = done;
    for (Py_ssize_t i = done; i < n; i++) {
        int hi, lo;
        if (s[i] == '%' && i + 2 < n && (hi = hex_digit(s[i + 1])) >= 0
            && (lo = hex_digit(s[i + 2])) >= 0) {
            out[w++] = (char)(hi * 16 + lo);
            i += 2;
        }
        else
            out[w++] = (char)s[i];
    }
    PyObject *result = decode(out, w);
    if (out != small)
        PyMem_Free(out);
    return result;
}

/* --------------------------------------------------------------------- header picker */

/* HeaderPicker: protocol.py's PyHeaderPicker (the specification) in one pass over the header
 * block: each line's name (up to its first ':', which must be followed by a space, since a
 * picked name holds no ':') is compared with the names of the same length; Python objects
 * are made only for the values picked. */
typedef struct {
    PyObject_HEAD
    PyObject *names;             /* tuple of str (ASCII, validated) */
    Py_ssize_t count;
    Py_ssize_t *lengths;         /* byte length of each name */
    unsigned char has_length[256]; /* 1 when some name is that long */
} Picker;

static PyObject *decode_value(PyObject *module, PyObject *raw);

static int
pickable_name(PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "header names are str, not %s", Py_TYPE(name)->tp_name);
        return 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    int ok = PyUnicode_IS_ASCII(name) && n >= 1 && n <= 255;
    const char *s = ok ? (const char *)PyUnicode_DATA(name) : NULL;
    for (Py_ssize_t i = 0; ok && i < n; i++)
        ok = s[i] >= '!' && s[i] <= '~' && s[i] != ':';
    if (!ok)
        PyErr_Format(PyExc_ValueError, "invalid header name: %R", name);
    return ok;
}

static int
Picker_init(Picker *self, PyObject *args, PyObject *kwargs)
{
    static char *kwnames[] = {"names", NULL};
    PyObject *names;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:HeaderPicker", kwnames, &names))
        return -1;
    /* dict.fromkeys(names): validated, duplicates dropped, order kept (as the Python twin). */
    PyObject *iterator = PyObject_GetIter(names);
    if (iterator == NULL)
        return -1;
    PyObject *unique = PyDict_New();
    if (unique == NULL) {
        Py_DECREF(iterator);
        return -1;
    }
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int ok = pickable_name(item) && PyDict_SetItem(unique, item, Py_None) == 0;
        Py_DECREF(item);
        if (!ok)
            break;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        Py_DECREF(unique);
        return -1;
    }
    PyObject *keys = PyDict_Keys(unique);
    Py_DECREF(unique);
    if (keys == NULL)
        return -1;
    PyObject *tuple = PyList_AsTuple(keys);
    Py_DECREF(keys);
    if (tuple == NULL)
        return -1;
    Py_ssize_t count = PyTuple_GET_SIZE(tuple);
    Py_ssize_t *lengths = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count ? count : 1));
    if (lengths == NULL) {
        Py_DECREF(tuple);
        PyErr_NoMemory();
        return -1;
    }
    memset(self->has_length, 0, sizeof(self->has_length));
    for (Py_ssize_t i = 0; i < count; i++) {
        lengths[i] = PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(tuple, i));
        self->has_length[lengths[i]] = 1;
    }
    Py_XSETREF(self->names, tuple);
    PyMem_Free(self->lengths);
    self->lengths = lengths;
    self->count = count;
    return 0;
}

static PyObject *
Picker_pick(Picker *self, PyObject *data)
{
    if (self->names == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HeaderPicker not initialised");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = self->count;
    /* value span of each name, -1 while not found */
    Py_ssize_t small[2 * 32];
    Py_ssize_t *spans = count <= 32 ? small : PyMem_Malloc(sizeof(Py_ssize_t) * 2 * (size_t)count);
    PyObject *found = NULL;
    if (spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < count; j++)
        spans[2 * j] = -1;
    const char *p = view.buf;
    Py_ssize_t n = view.len;
    Py_ssize_t missing = count;
    Py_ssize_t line = 0;
    while (line < n && missing > 0) {
        const char *nl = memchr(p + line, '\n', (size_t)(n - line));
        Py_ssize_t stop = nl ? nl - p : n;
        /* The block ends at a blank line (or a lone CR) that a newline ends and one precedes:
         * the first match of the Python twin's \n\r?\n. */
        if (nl != NULL && line > 0 && (stop == line || (stop == line + 1 && p[line] == '\r')))
            break;
        const char *colon = memchr(p + line, ':', (size_t)(stop - line));
        if (colon != NULL && colon + 1 < p + stop && colon[1] == ' ') {
            Py_ssize_t length = colon - (p + line);
            if (length < 256 && self->has_length[length]) {
                for (Py_ssize_t j = 0; j < count; j++) {
                    if (self->lengths[j] != length || spans[2 * j] >= 0)
                        continue;
                    PyObject *name = PyTuple_GET_ITEM(self->names, j);
                    if (memcmp(PyUnicode_DATA(name), p + line, (size_t)length) != 0)
                        continue;
                    Py_ssize_t value = line + length + 2;
                    spans[2 * j] = value;
                    spans[2 * j + 1] = (stop > value && p[stop - 1] == '\r') ? stop - 1 : stop;
                    missing--;
                    break;
                }
            }
        }
        line = stop + 1;
    }
    found = PyDict_New();
    if (found == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < count; j++) {
        if (spans[2 * j] < 0)
            continue;
        PyObject *raw = decode(p + spans[2 * j], spans[2 * j + 1] - spans[2 * j]);
        PyObject *value = raw ? decode_value(NULL, raw) : NULL;
        Py_XDECREF(raw);
        if (value == NULL || PyDict_SetItem(found, PyTuple_GET_ITEM(self->names, j), value) < 0) {
            Py_XDECREF(value);
            Py_CLEAR(found);
            goto done;
        }
        Py_DECREF(value);
    }
done:
    if (spans != NULL && spans != small)
        PyMem_Free(spans);
    PyBuffer_Release(&view);
    return found;
}

static PyObject *
Picker_names(Picker *self, void *closure)
{
    if (self->names == NULL)
        return PyTuple_New(0);
    return Py_NewRef(self->names);
}

static void
Picker_dealloc(Picker *self)
{
    Py_CLEAR(self->names);
    PyMem_Free(self->lengths);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Picker_methods[] = {
    {"pick", (PyCFunction)Picker_pick, METH_O,
     "pick(body) -> {name: decoded value} of the names present in the event's header block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Picker_getset[] = {
    {"names", (getter)Picker_names, NULL, "The names picked, in order.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PickerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine.esl._speedups.HeaderPicker",
    .tp_doc = "A few named headers of serialized events (compiled twin of PyHeaderPicker).",
    .tp_basicsize = sizeof(Picker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Picker_init,
    .tp_dealloc = (destructor)Picker_dealloc,
    .tp_methods = Picker_methods,
    .tp_getset = Picker_getset,
};

static PyObject *
setup(PyObject *module, PyObject *args)
{
    PyObject *factory, *error, *bad, *length, *decode_py;
    if (!PyArg_ParseTuple(args, "OOOOO:setup", &factory, &error, &bad, &length, &decode_py))
        return NULL;
    Py_XSETREF(frame_factory, Py_NewRef(factory));
    Py_XSETREF(protocol_error, Py_NewRef(error));
    Py_XSETREF(bad_line, Py_NewRef(bad));
    Py_XSETREF(content_length, Py_NewRef(length));
    Py_XSETREF(py_decode_value, Py_NewRef(decode_py));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(frame_factory, ProtocolError, bad_line, content_length, decode_value): the Python "
     "helpers this module calls; protocol.py calls it once at import."},
    {"decode_value", decode_value, METH_O,
     "Undo FreeSWITCH's percent-encoding of one header value (_undef_ means empty)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "engine.esl._speedups",
    .m_doc = "Compiled ESL framer and value decoder (see engine/esl/protocol.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&ParserType) < 0 || PyType_Ready(&PickerType) < 0)
        return NULL;
    str_content_length = PyUnicode_InternFromString("Content-Length");
    str_content_type = PyUnicode_InternFromString("Content-Type");
    str_empty = PyUnicode_FromString("");
    str_frames = PyUnicode_InternFromString("frames");
    str_undef = PyUnicode_InternFromString("_undef_");
    if (!str_content_length || !str_content_type || !str_empty || !str_frames || !str_undef)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "EslParser", (PyObject *)&ParserType) < 0
        || PyModule_AddObjectRef(module, "HeaderPicker", (PyObject *)&PickerType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
