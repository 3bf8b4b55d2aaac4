/* Optional C speed-ups of the wire codec (see synapse_replication._json).
 *
 * Everything here has a pure-Python twin that gives identical results
 * (synapse_replication._json._plain and _ascii_json_py,
 * commands._encode_rdata_py, the RDATA
 * case of commands.parse_command_from_bytes and the
 * builders of _fastattrs.fast_constructor); the package works the same
 * without this module, only slower. Nothing here calls back into Python code
 * except `encode` in encode_rdata, so no object can change under our feet.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* Deeper values are left to the pure-Python and standard-library paths. */
#define MAX_DEPTH 100

static int
plain(PyObject *v, int depth)
{
    PyTypeObject *t = Py_TYPE(v);
    Py_ssize_t i, n;

    if (t == &PyUnicode_Type || t == &PyLong_Type || v == Py_None || t == &PyBool_Type)
        return 1;
    if (depth >= MAX_DEPTH)
        return 0;
    if (t == &PyList_Type) {
        n = PyList_GET_SIZE(v);
        for (i = 0; i < n; i++) {
            if (!plain(PyList_GET_ITEM(v, i), depth + 1))
                return 0;
        }
        return 1;
    }
    if (t == &PyTuple_Type) {
        n = PyTuple_GET_SIZE(v);
        for (i = 0; i < n; i++) {
            if (!plain(PyTuple_GET_ITEM(v, i), depth + 1))
                return 0;
        }
        return 1;
    }
    if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (Py_TYPE(key) != &PyUnicode_Type || !plain(item, depth + 1))
                return 0;
        }
        return 1;
    }
    return 0;
}

static PyObject *
plain_json(PyObject *module, PyObject *value)
{
    return PyBool_FromLong(plain(value, 0));
}

static const char HEX[] = "0123456789abcdef";

static char *
put_u(char *q, unsigned int c)
{
    q[0] = '\\';
    q[1] = 'u';
    q[2] = HEX[(c >> 12) & 0xf];
    q[3] = HEX[(c >> 8) & 0xf];
    q[4] = HEX[(c >> 4) & 0xf];
    q[5] = HEX[c & 0xf];
    return q + 6;
}

/* `json` (msgspec's UTF-8 output) with every non-ASCII character and DEL
 * written as a \uXXXX escape (a surrogate pair beyond the BMP), as the
 * standard library's ensure_ascii does: a new reference, or `json` itself
 * (a new reference too) if there is nothing to escape. Outside strings, JSON
 * has only ASCII, so only string contents change. */
static PyObject *
escape_non_ascii(PyObject *json)
{
    const unsigned char *j = (const unsigned char *)PyBytes_AS_STRING(json);
    Py_ssize_t n = PyBytes_GET_SIZE(json), k, size = 0;
    PyObject *out;
    char *q;

    for (k = 0; k < n; k++) {
        unsigned char b = j[k];
        if (b < 0x7f)
            size += 1;
        else if (b == 0x7f)
            size += 6;
        else if (b >= 0xf0)
            size += 12; /* a lead byte of four: a surrogate pair */
        else if (b >= 0xc0)
            size += 6;  /* a lead byte of two or three: one \uXXXX */
        /* continuation bytes: written with their lead byte */
    }
    if (size == n) {
        Py_INCREF(json);
        return json;
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    q = PyBytes_AS_STRING(out);
    for (k = 0; k < n;) {
        unsigned char b = j[k];
        unsigned int c;
        if (b < 0x7f) {
            *q++ = (char)b;
            k += 1;
            continue;
        }
        if (b == 0x7f) {
            c = 0x7f;
            k += 1;
        }
        else if (b >= 0xf0 && k + 3 < n) {
            c = ((b & 0x07u) << 18) | ((j[k + 1] & 0x3fu) << 12) | ((j[k + 2] & 0x3fu) << 6)
                | (j[k + 3] & 0x3fu);
            k += 4;
            c -= 0x10000;
            q = put_u(q, 0xd800 | (c >> 10));
            q = put_u(q, 0xdc00 | (c & 0x3ff));
            continue;
        }
        else if (b >= 0xe0 && k + 2 < n) {
            c = ((b & 0x0fu) << 12) | ((j[k + 1] & 0x3fu) << 6) | (j[k + 2] & 0x3fu);
            k += 3;
        }
        else if (b >= 0xc0 && k + 1 < n) {
            c = ((b & 0x1fu) << 6) | (j[k + 1] & 0x3fu);
            k += 2;
        }
        else {
            /* Not UTF-8 as msgspec writes it: cannot happen; refuse. */
            Py_DECREF(out);
            PyErr_SetString(PyExc_ValueError, "unexpected byte in encoder output");
            return NULL;
        }
        q = put_u(q, c);
    }
    if (q != PyBytes_AS_STRING(out) + size) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "unexpected encoder output");
        return NULL;
    }
    return out;
}

/* ascii_json(value, encode): what encode_json_bytes returns for `value`, if
 * `value` is plain (see plain()) and encode(value) (msgspec) takes it; None,
 * with no exception, otherwise. */
static PyObject *
ascii_json_impl(PyObject *value, PyObject *encode)
{
    PyObject *json, *out;
    if (!plain(value, 0))
        Py_RETURN_NONE;
    json = PyObject_CallOneArg(encode, value);
    if (json == NULL || !PyBytes_CheckExact(json)) {
        Py_XDECREF(json);
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    out = escape_non_ascii(json);
    Py_DECREF(json);
    if (out == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return out;
}

static PyObject *
ascii_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ascii_json takes 2 arguments");
        return NULL;
    }
    return ascii_json_impl(args[0], args[1]);
}

/* The UTF-8 of `name` if it is a non-empty exact str with neither a space nor
 * a newline (and no lone surrogate); NULL, with no exception set, otherwise. */
static const char *
word(PyObject *name, Py_ssize_t *size)
{
    const char *s;
    if (Py_TYPE(name) != &PyUnicode_Type)
        return NULL;
    s = PyUnicode_AsUTF8AndSize(name, size);
    if (s == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (*size == 0 || memchr(s, ' ', *size) != NULL || memchr(s, '\n', *size) != NULL)
        return NULL;
    return s;
}

static PyObject *
encode_rdata(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *stream, *instance, *token, *row, *encode;
    PyObject *token_text = NULL, *json = NULL, *out = NULL;
    const char *s, *i, *t, *j;
    Py_ssize_t s_len, i_len, t_len, j_len;
    char *p;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode_rdata takes 5 arguments");
        return NULL;
    }
    stream = args[0];
    instance = args[1];
    token = args[2];
    row = args[3];
    encode = args[4];

    if ((s = word(stream, &s_len)) == NULL || (i = word(instance, &i_len)) == NULL)
        Py_RETURN_NONE;
    if (token == Py_None) {
        t = "batch";
        t_len = 5;
    }
    else if (Py_TYPE(token) == &PyLong_Type) {
        token_text = PyObject_Str(token);
        if (token_text == NULL)
            goto fallback;
        t = PyUnicode_AsUTF8AndSize(token_text, &t_len);
        if (t == NULL)
            goto fallback;
    }
    else
        Py_RETURN_NONE;
    json = ascii_json_impl(row, encode);
    if (json == NULL)
        goto error;
    if (json == Py_None)
        goto fallback;
    j = PyBytes_AS_STRING(json);
    j_len = PyBytes_GET_SIZE(json);

    out = PyBytes_FromStringAndSize(NULL, 6 + s_len + 1 + i_len + 1 + t_len + 1 + j_len);
    if (out == NULL)
        goto error;
    p = PyBytes_AS_STRING(out);
    memcpy(p, "RDATA ", 6);
    p += 6;
    memcpy(p, s, s_len);
    p += s_len;
    *p++ = ' ';
    memcpy(p, i, i_len);
    p += i_len;
    *p++ = ' ';
    memcpy(p, t, t_len);
    p += t_len;
    *p++ = ' ';
    memcpy(p, j, j_len);
    Py_XDECREF(token_text);
    Py_DECREF(json);
    return out;

fallback:
    /* Whatever went wrong, the pure-Python path decides (and raises). */
    PyErr_Clear();
    Py_XDECREF(token_text);
    Py_XDECREF(json);
    Py_RETURN_NONE;

error:
    Py_XDECREF(token_text);
    Py_XDECREF(json);
    return NULL;
}

/* parse_rdata(line, decode, new): the RDATA command on `line` (bytes), as
 * new(stream_name, instance_name, token, decode(row_json)), if the line is
 * certainly well formed; None to leave it, and every error, to the pure-Python
 * path (the RDATA case of commands.parse_command_from_bytes, which takes and
 * refuses exactly the same lines). */

#define MAX_DIGITS 1000

static PyObject *
parse_rdata(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *line, *decode, *new;
    PyObject *stream = NULL, *instance = NULL, *token = NULL, *json = NULL, *row = NULL;
    PyObject *result = NULL;
    const char *p, *end, *f[4];
    Py_ssize_t len[4], k, n;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse_rdata takes 3 arguments");
        return NULL;
    }
    line = args[0];
    decode = args[1];
    new = args[2];
    if (!PyBytes_CheckExact(line))
        Py_RETURN_NONE;
    p = PyBytes_AS_STRING(line);
    n = PyBytes_GET_SIZE(line);
    if (n < 6 || memcmp(p, "RDATA ", 6) != 0)
        Py_RETURN_NONE;
    end = p + n;
    p += 6;
    /* stream, instance, token: up to the next space; then the JSON. */
    for (k = 0; k < 3; k++) {
        const char *space = memchr(p, ' ', end - p);
        if (space == NULL)
            Py_RETURN_NONE;
        f[k] = p;
        len[k] = space - p;
        p = space + 1;
    }
    f[3] = p;
    len[3] = end - p;
    if (len[0] == 0 || len[1] == 0)
        Py_RETURN_NONE;

    if (len[2] == 5 && memcmp(f[2], "batch", 5) == 0) {
        token = Py_None;
        Py_INCREF(token);
    }
    else {
        if (len[2] == 0 || len[2] >= MAX_DIGITS)
            Py_RETURN_NONE;
        for (k = 0; k < len[2]; k++) {
            if (f[2][k] < '0' || f[2][k] > '9')
                Py_RETURN_NONE;
        }
        if (len[2] <= 18) {
            long long value = 0;
            for (k = 0; k < len[2]; k++)
                value = value * 10 + (f[2][k] - '0');
            token = PyLong_FromLongLong(value);
        }
        else {
            char digits[MAX_DIGITS];
            memcpy(digits, f[2], len[2]);
            digits[len[2]] = '\0';
            token = PyLong_FromString(digits, NULL, 10);
        }
        if (token == NULL)
            goto fallback;
    }
    stream = PyUnicode_DecodeUTF8(f[0], len[0], "strict");
    if (stream == NULL)
        goto fallback;
    instance = PyUnicode_DecodeUTF8(f[1], len[1], "strict");
    if (instance == NULL)
        goto fallback;
    json = PyBytes_FromStringAndSize(f[3], len[3]);
    if (json == NULL)
        goto fallback;
    row = PyObject_CallOneArg(decode, json);
    if (row == NULL)
        goto fallback;
    {
        PyObject *call_args[4] = {stream, instance, token, row};
        result = PyObject_Vectorcall(new, call_args, 4, NULL);
    }
    if (result == NULL)
        goto fallback;
    Py_DECREF(stream);
    Py_DECREF(instance);
    Py_DECREF(token);
    Py_DECREF(json);
    Py_DECREF(row);
    return result;

fallback:
    PyErr_Clear();
    Py_XDECREF(stream);
    Py_XDECREF(instance);
    Py_XDECREF(token);
    Py_XDECREF(json);
    Py_XDECREF(row);
    Py_RETURN_NONE;
}

/* build_row(new, values, spec): new(*fields) if `values` (an exact list) has
 * one item per character of `spec` (bytes) and each item is what its
 * character asks for; None, with no exception, otherwise. The characters:
 *   s  an exact str
 *   o  None or an exact str
 *   b  true/false, or an exact int 0/1 (SQLite): passed on as a bool
 *   d  an exact dict
 *   L  an exact list of exact strs: passed on as a tuple
 * The inline checks of the streams' parse_row are its pure-Python twin. */

#define MAX_FIELDS 16

static PyObject *
build_row(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *new, *values, *spec, *result;
    PyObject *fields[MAX_FIELDS] = {NULL};
    PyObject *owned[MAX_FIELDS];
    const char *sp;
    Py_ssize_t n, k, m, n_owned = 0;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "build_row takes 3 arguments");
        return NULL;
    }
    new = args[0];
    values = args[1];
    spec = args[2];
    if (!PyBytes_CheckExact(spec)) {
        PyErr_SetString(PyExc_TypeError, "build_row: spec must be bytes");
        return NULL;
    }
    sp = PyBytes_AS_STRING(spec);
    n = PyBytes_GET_SIZE(spec);
    if (n > MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "build_row: too many fields");
        return NULL;
    }
    if (!PyList_CheckExact(values) || PyList_GET_SIZE(values) != n)
        Py_RETURN_NONE;
    for (k = 0; k < n; k++) {
        PyObject *v = PyList_GET_ITEM(values, k);
        PyTypeObject *t = Py_TYPE(v);
        switch (sp[k]) {
        case 's':
            if (t != &PyUnicode_Type)
                goto refuse;
            fields[k] = v;
            break;
        case 'o':
            if (v != Py_None && t != &PyUnicode_Type)
                goto refuse;
            fields[k] = v;
            break;
        case 'b':
            if (v == Py_True || v == Py_False)
                fields[k] = v;
            else if (t == &PyLong_Type) {
                int overflow;
                long x = PyLong_AsLongAndOverflow(v, &overflow);
                if (overflow || (x != 0 && x != 1)) {
                    PyErr_Clear();
                    goto refuse;
                }
                fields[k] = x ? Py_True : Py_False;
            }
            else
                goto refuse;
            break;
        case 'd':
            if (t != &PyDict_Type)
                goto refuse;
            fields[k] = v;
            break;
        case 'L':
            if (t != &PyList_Type)
                goto refuse;
            for (m = 0; m < PyList_GET_SIZE(v); m++) {
                if (Py_TYPE(PyList_GET_ITEM(v, m)) != &PyUnicode_Type)
                    goto refuse;
            }
            fields[k] = PyList_AsTuple(v);
            if (fields[k] == NULL)
                goto error;
            owned[n_owned++] = fields[k];
            break;
        default:
            PyErr_Format(PyExc_ValueError, "build_row: unknown spec character %c", sp[k]);
            goto error;
        }
    }
    result = PyObject_Vectorcall(new, fields, n, NULL);
    for (k = 0; k < n_owned; k++)
        Py_DECREF(owned[k]);
    return result;

refuse:
    for (k = 0; k < n_owned; k++)
        Py_DECREF(owned[k]);
    Py_RETURN_NONE;

error:
    for (k = 0; k < n_owned; k++)
        Py_DECREF(owned[k]);
    return NULL;
}

/* group_rows(new, spec, rows): for database rows ``(token, *columns)``, the
 * list ``[(token, [new(*fields)]), ...]``, one group per row, in the order of
 * `rows`. spec has one character per column:
 *   o  passed on as it is
 *   b  passed on as a bool (its truth value: SQLite gives 0/1)
 * It is the C twin of the list comprehension in storage/events.py that builds
 * the ``ev`` rows of a catch-up page; the columns were written by the store
 * itself, so no type is checked but the shape of each row. */

static PyObject *
group_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *new, *rows, *spec, *out;
    PyObject *fields[MAX_FIELDS];
    const char *sp;
    Py_ssize_t n, i, k, count;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "group_rows takes 3 arguments");
        return NULL;
    }
    new = args[0];
    spec = args[1];
    rows = args[2];
    if (!PyBytes_CheckExact(spec) || !PyList_CheckExact(rows)) {
        PyErr_SetString(PyExc_TypeError, "group_rows: rows must be a list and spec bytes");
        return NULL;
    }
    sp = PyBytes_AS_STRING(spec);
    n = PyBytes_GET_SIZE(spec);
    if (n > MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "group_rows: too many fields");
        return NULL;
    }
    for (k = 0; k < n; k++) {
        if (sp[k] != 'o' && sp[k] != 'b') {
            PyErr_Format(PyExc_ValueError, "group_rows: unknown spec character %c", sp[k]);
            return NULL;
        }
    }
    /* A snapshot: `new` or a column's __bool__ could change the list. */
    rows = PyList_AsTuple(rows);
    if (rows == NULL)
        return NULL;
    count = PyTuple_GET_SIZE(rows);
    out = PyList_New(count);
    if (out == NULL) {
        Py_DECREF(rows);
        return NULL;
    }
    for (i = 0; i < count; i++) {
        PyObject *row = PyTuple_GET_ITEM(rows, i), *obj, *inner, *pair;
        if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != n + 1) {
            PyErr_Format(PyExc_TypeError,
                         "group_rows: row %zd is not a tuple of %zd columns", i, n + 1);
            goto error;
        }
        for (k = 0; k < n; k++) {
            PyObject *v = PyTuple_GET_ITEM(row, k + 1);
            if (sp[k] == 'b') {
                int truth = PyObject_IsTrue(v);
                if (truth < 0)
                    goto error;
                v = truth ? Py_True : Py_False;
            }
            fields[k] = v;
        }
        obj = PyObject_Vectorcall(new, fields, n, NULL);
        if (obj == NULL)
            goto error;
        inner = PyList_New(1);
        if (inner == NULL) {
            Py_DECREF(obj);
            goto error;
        }
        PyList_SET_ITEM(inner, 0, obj);
        pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(inner);
            goto error;
        }
        Py_INCREF(PyTuple_GET_ITEM(row, 0));
        PyTuple_SET_ITEM(pair, 0, PyTuple_GET_ITEM(row, 0));
        PyTuple_SET_ITEM(pair, 1, inner);
        PyList_SET_ITEM(out, i, pair);
    }
    Py_DECREF(rows);
    return out;

error:
    /* The items not yet set are NULL, which list_dealloc skips. */
    Py_DECREF(out);
    Py_DECREF(rows);
    return NULL;
}

/* Builder(cls, names): a callable that builds a `cls` instance from one
 * positional argument per name, stored in the slot of that name, as the
 * pure-Python builder of synapse_replication._fastattrs does (which checks
 * that `cls` is a class for which that is the same as calling it). */

typedef struct {
    PyObject_HEAD
    PyTypeObject *cls;
    Py_ssize_t n;
    Py_ssize_t *offsets;
    vectorcallfunc vectorcall;
} BuilderObject;

static PyObject *
builder_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    BuilderObject *b = (BuilderObject *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), k;
    PyObject *obj;

    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) || nargs != b->n) {
        PyErr_Format(PyExc_TypeError, "%s builder takes exactly %zd positional arguments",
                     b->cls->tp_name, b->n);
        return NULL;
    }
    obj = b->cls->tp_alloc(b->cls, 0);
    if (obj == NULL)
        return NULL;
    for (k = 0; k < nargs; k++) {
        Py_INCREF(args[k]);
        *(PyObject **)((char *)obj + b->offsets[k]) = args[k];
    }
    return obj;
}

static PyObject *
builder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cls, *names, *descr;
    PyMemberDef *member;
    BuilderObject *b;
    Py_ssize_t k, n;

    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Builder takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!:Builder", &PyType_Type, &cls, &PyTuple_Type, &names))
        return NULL;
    if (!(((PyTypeObject *)cls)->tp_flags & Py_TPFLAGS_HEAPTYPE)
        || ((PyTypeObject *)cls)->tp_itemsize != 0) {
        PyErr_SetString(PyExc_TypeError, "Builder needs a heap type without items");
        return NULL;
    }
    n = PyTuple_GET_SIZE(names);
    b = (BuilderObject *)type->tp_alloc(type, 0);
    if (b == NULL)
        return NULL;
    b->offsets = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    if (b->offsets == NULL) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    for (k = 0; k < n; k++) {
        descr = PyObject_GetAttr(cls, PyTuple_GET_ITEM(names, k));
        if (descr == NULL) {
            Py_DECREF(b);
            return NULL;
        }
        if (!PyObject_TypeCheck(descr, &PyMemberDescr_Type)
            || ((PyDescrObject *)descr)->d_type != (PyTypeObject *)cls) {
            Py_DECREF(descr);
            Py_DECREF(b);
            PyErr_SetString(PyExc_TypeError, "Builder: not a slot of the class itself");
            return NULL;
        }
        member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)
            || member->offset < (Py_ssize_t)sizeof(PyObject)
            || member->offset + (Py_ssize_t)sizeof(PyObject *)
                   > ((PyTypeObject *)cls)->tp_basicsize) {
            Py_DECREF(descr);
            Py_DECREF(b);
            PyErr_SetString(PyExc_TypeError, "Builder: not a plain object slot");
            return NULL;
        }
        b->offsets[k] = member->offset;
        Py_DECREF(descr);
    }
    Py_INCREF(cls);
    b->cls = (PyTypeObject *)cls;
    b->n = n;
    b->vectorcall = builder_vectorcall;
    return (PyObject *)b;
}

static void
builder_dealloc(BuilderObject *b)
{
    Py_XDECREF(b->cls);
    PyMem_Free(b->offsets);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyTypeObject BuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "synapse_replication._speedups.Builder",
    .tp_basicsize = sizeof(BuilderObject),
    .tp_dealloc = (destructor)builder_dealloc,
    .tp_vectorcall_offset = offsetof(BuilderObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Builder(cls, names): builds cls instances from slot values.",
    .tp_new = builder_new,
};

static PyMethodDef methods[] = {
    {"plain_json", (PyCFunction)plain_json, METH_O,
     "True if the value holds only str, int, bool, None, lists, tuples and "
     "str-keyed dicts, nested at most 100 deep."},
    {"parse_rdata", (PyCFunction)(void (*)(void))parse_rdata, METH_FASTCALL,
     "parse_rdata(line, decode, new): the RDATA command on the line, or None "
     "if the pure-Python path must decide."},
    {"ascii_json", (PyCFunction)(void (*)(void))ascii_json, METH_FASTCALL,
     "ascii_json(value, encode): the JSON the standard library writes for "
     "value, from msgspec's, or None if the value is not plain."},
    {"build_row", (PyCFunction)(void (*)(void))build_row, METH_FASTCALL,
     "build_row(new, values, spec): new(*fields) if the values match spec, "
     "else None."},
    {"group_rows", (PyCFunction)(void (*)(void))group_rows, METH_FASTCALL,
     "group_rows(new, spec, rows): [(row[0], [new(*row[1:])]) for row in rows], "
     "the columns marked b in spec made bools."},
    {"encode_rdata", (PyCFunction)(void (*)(void))encode_rdata, METH_FASTCALL,
     "encode_rdata(stream_name, instance_name, token, row, encode): the RDATA "
     "line as bytes, or None if the plain path must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "synapse_replication._speedups",
    "Optional C speed-ups of the wire codec.",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m;
    if (PyType_Ready(&BuilderType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BuilderType);
    if (PyModule_AddObject(m, "Builder", (PyObject *)&BuilderType) < 0) {
        Py_DECREF(&BuilderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
