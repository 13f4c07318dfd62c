/* The Internet checksum's one's-complement sum (RFC 1071) in C.
 *
 * stack/wire/checksum.py holds the definition and the pure-Python fallback;
 * this module owns nothing but one function with exactly its semantics:
 *
 *     ones_complement_sum(data, initial=0) -> int in 0..0xFFFF
 *
 * Why C: without offload every segment's payload is summed, and CPython
 * cannot go below about 0.55 ns per byte (int.from_bytes and a division per
 * digit); this loop costs a few hundredths of that, so a call is dominated
 * by its own overhead (docs/wire.md, docs/performance.md).
 *
 * How: RFC 1071 section 2 lets the sum be taken over wider words and in
 * either byte order, with the carries folded back at the end. 32-bit words
 * are loaded with memcpy (no unaligned access, no aliasing games) and added
 * into 64-bit accumulators, which cannot overflow before 2**32 words; gcc
 * vectorizes the loop at -O3 and keeps it a tight scalar loop at -O2, both
 * about 0.03 ns per byte on the development VM. A host-order sum is the
 * byte-swapped network-order sum on a little-endian machine (section 2(B)).
 * The GIL is held: the buffers are a packet's worth of bytes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Words added before the accumulator is folded: far below 2**32, so no
 * 64-bit accumulator can overflow in between, whatever the buffer size. */
#define BLOCK_WORDS ((size_t)1 << 30)

/* The sum of `n` bytes as 32-bit host-order words, zero-padded at the end,
 * not folded; non-zero exactly when some byte is non-zero. */
static uint64_t
sum32(const unsigned char *p, size_t n)
{
    uint64_t total = 0;
    while (n >= 4) {
        size_t words = n / 4;
        if (words > BLOCK_WORDS)
            words = BLOCK_WORDS;
        /* Four accumulators: independent adds the compiler can pair or
         * vectorize; each gets at most BLOCK_WORDS / 4 words. */
        uint64_t a = 0, b = 0, c = 0, d = 0;
        size_t i = 0;
        for (; i + 4 <= words; i += 4) {
            uint32_t w[4];
            memcpy(w, p + 4 * i, sizeof w);
            a += w[0];
            b += w[1];
            c += w[2];
            d += w[3];
        }
        for (; i < words; i++) {
            uint32_t w;
            memcpy(&w, p + 4 * i, sizeof w);
            a += w;
        }
        uint64_t block = (a >> 32) + (a & 0xFFFFFFFFu) + (b >> 32) + (b & 0xFFFFFFFFu) +
                         (c >> 32) + (c & 0xFFFFFFFFu) + (d >> 32) + (d & 0xFFFFFFFFu);
        /* Congruent modulo 0xFFFF (2**32 == 1), non-zero if the block was;
         * below 2**35, so the running total stays far from overflow. */
        total = (total >> 32) + (total & 0xFFFFFFFFu) + block;
        p += 4 * words;
        n -= 4 * words;
    }
    if (n) {
        /* RFC 1071's zero pad: the tail starts on a word boundary of the
         * data, so its bytes keep their places in a zeroed word. */
        unsigned char tail[4] = {0, 0, 0, 0};
        uint32_t w;
        memcpy(tail, p, n);
        memcpy(&w, tail, sizeof w);
        total += w;
    }
    return total;
}

/* Fold to 16 bits and reduce modulo 0xFFFF, in network byte order. */
static unsigned int
fold(uint64_t s)
{
    s = (s >> 32) + (s & 0xFFFFFFFFu);
    s = (s >> 32) + (s & 0xFFFFFFFFu);
    s = (s >> 16) + (s & 0xFFFFu);
    s = (s >> 16) + (s & 0xFFFFu);
    s = (s >> 16) + (s & 0xFFFFu);
#if !PY_BIG_ENDIAN
    s = ((s >> 8) | (s << 8)) & 0xFFFFu;
#endif
    return (unsigned int)(s % 0xFFFFu);
}

/* `initial` modulo 0xFFFF into *rem and whether it is non-zero into
 * *nonzero; any int, however large (or negative), as Python's `%` takes it. */
static int
reduce_initial(PyObject *initial, unsigned int *rem, int *nonzero)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(initial);
    if (!(v == (unsigned long long)-1 && PyErr_Occurred())) {
        *rem = (unsigned int)(v % 0xFFFFu);
        *nonzero = v != 0;
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_OverflowError))
        return -1;  /* not an int: TypeError, as the Python version's `+` */
    PyErr_Clear();
    PyObject *modulus = PyLong_FromUnsignedLong(0xFFFFu);
    if (modulus == NULL)
        return -1;
    PyObject *r = PyNumber_Remainder(initial, modulus);
    Py_DECREF(modulus);
    if (r == NULL)
        return -1;
    *rem = (unsigned int)PyLong_AsUnsignedLong(r);
    Py_DECREF(r);
    if (PyErr_Occurred())
        return -1;
    /* A value that did not fit in 64 bits unsigned is never zero. */
    *nonzero = 1;
    return 0;
}

static PyObject *
ones_complement_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    static const char usage[] = "ones_complement_sum(data, initial=0)";
    PyObject *data = nargs > 0 ? args[0] : NULL;
    PyObject *initial = nargs > 1 ? args[1] : NULL;
    (void)module;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s takes at most 2 arguments (%zd given)", usage,
                     nargs);
        return NULL;
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            PyObject **slot;
            if (PyUnicode_CompareWithASCIIString(name, "data") == 0)
                slot = &data;
            else if (PyUnicode_CompareWithASCIIString(name, "initial") == 0)
                slot = &initial;
            else {
                PyErr_Format(PyExc_TypeError, "%s got an unexpected keyword argument '%U'",
                             usage, name);
                return NULL;
            }
            if (*slot != NULL) {
                PyErr_Format(PyExc_TypeError, "%s got multiple values for argument '%U'",
                             usage, name);
                return NULL;
            }
            *slot = args[nargs + i];
        }
    }
    if (data == NULL) {
        PyErr_Format(PyExc_TypeError, "%s missing required argument 'data'", usage);
        return NULL;
    }

    unsigned int rem = 0;
    int init_nonzero = 0;
    if (initial != NULL && reduce_initial(initial, &rem, &init_nonzero) < 0)
        return NULL;

    uint64_t raw;
    if (PyBytes_CheckExact(data)) {
        raw = sum32((const unsigned char *)PyBytes_AS_STRING(data),
                    (size_t)PyBytes_GET_SIZE(data));
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) == 0) {
            raw = sum32((const unsigned char *)view.buf, (size_t)view.len);
            PyBuffer_Release(&view);
        }
        else {
            /* A strided memoryview, or no buffer at all: take the bytes the
             * way int.from_bytes in the Python version does. */
            if (!PyErr_ExceptionMatches(PyExc_BufferError) &&
                !PyErr_ExceptionMatches(PyExc_TypeError))
                return NULL;
            PyErr_Clear();
            PyObject *copy = PyBytes_FromObject(data);
            if (copy == NULL)
                return NULL;
            raw = sum32((const unsigned char *)PyBytes_AS_STRING(copy),
                        (size_t)PyBytes_GET_SIZE(copy));
            Py_DECREF(copy);
        }
    }

    unsigned int r = (fold(raw) + rem) % 0xFFFFu;
    /* One's complement has two zeros: only all-zero input gives +0. */
    if (r == 0 && (raw != 0 || init_nonzero))
        r = 0xFFFFu;
    return PyLong_FromUnsignedLong(r);
}

PyDoc_STRVAR(ones_complement_sum_doc,
             "ones_complement_sum(data, initial=0)\n--\n\n"
             "The folded 16-bit one's-complement sum of `data` plus `initial`;\n"
             "see stack.wire.checksum.ones_complement_sum.");

static PyMethodDef methods[] = {
    {"ones_complement_sum", (PyCFunction)(void (*)(void))ones_complement_sum,
     METH_FASTCALL | METH_KEYWORDS, ones_complement_sum_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "stack.wire._checksum",
    .m_doc = "The Internet checksum's one's-complement sum in C; "
             "stack.wire.checksum is the definition and the fallback.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__checksum(void)
{
    return PyModuleDef_Init(&module_def);
}
