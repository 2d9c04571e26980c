/* The reporter of the seccomp sandbox: a SIGSYS handler that names the forbidden
 * system call and the thread that made it, then ends the process.
 *
 * Why C: a filter's SECCOMP_RET_TRAP raises SIGSYS on the very thread that made the
 * call, which may be any thread, often inside a C library routine. CPython runs Python
 * signal handlers only on the main thread, later, and lets the trapped call "return" the
 * syscall number meanwhile; a Python handler entered through ctypes would take the GIL
 * and allocate inside a signal handler (a deadlock if the call was made, say, by fork
 * with malloc's locks held). This handler does only async-signal-safe things: it formats
 * one line into a stack buffer, write(2)s it, lets faulthandler (also async-signal-safe)
 * dump the thread's Python traceback, and calls _exit. The system calls it makes
 * (prctl PR_GET_NAME, gettid, write, exit_group) are allowed in every role.
 *
 * What does not live here: the filters (bpf.py, policy.py) and when they are installed
 * (sandbox/__init__.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define AUDIT_ARCH_X86_64 0xC000003Eu

static char **names;           /* syscall number -> name (NULL: unknown), set by install */
static Py_ssize_t n_names;
static int exit_status = 159;  /* 128 + SIGSYS */
static int report_fd = 2;
static struct sigaction previous;  /* faulthandler's handler: the Python traceback */

static size_t put(char *buf, size_t at, size_t cap, const char *s)
{
    while (*s && at + 1 < cap)
        buf[at++] = *s++;
    return at;
}

static size_t put_num(char *buf, size_t at, size_t cap, unsigned long v, unsigned base)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v && n < (int)sizeof digits);
    if (base == 16)
        at = put(buf, at, cap, "0x");
    while (n && at + 1 < cap)
        buf[at++] = digits[--n];
    return at;
}

static void on_sigsys(int sig, siginfo_t *info, void *context)
{
    char line[512];
    char comm[17] = {0};
    size_t n = 0, cap = sizeof line;
    int nr = info->si_syscall;
    ucontext_t *uc = context;

    long tid = syscall(SYS_gettid);
    prctl(PR_GET_NAME, comm, 0, 0, 0);
    n = put(line, n, cap, "corevisor: sandbox: ");
    if (tid == getpid()) {
        n = put(line, n, cap, "the main thread");
    } else {
        n = put(line, n, cap, "thread ");
        n = put(line, n, cap, comm[0] ? comm : "?");
    }
    n = put(line, n, cap, " (tid ");
    n = put_num(line, n, cap, (unsigned long)tid, 10);
    n = put(line, n, cap, ") made a system call its seccomp filter forbids: ");
    if (info->si_arch != AUDIT_ARCH_X86_64) {
        n = put(line, n, cap, "number ");
        n = put_num(line, n, cap, (unsigned)nr, 10);
        n = put(line, n, cap, " of a foreign ABI (arch ");
        n = put_num(line, n, cap, (unsigned)info->si_arch, 16);
        n = put(line, n, cap, ")");
    } else {
        const char *name = nr >= 0 && nr < n_names && names[nr] ? names[nr] : "unknown";
        n = put(line, n, cap, name);
        n = put(line, n, cap, " (");
        n = put_num(line, n, cap, (unsigned)nr, 10);
        n = put(line, n, cap, ")");
        if (nr == SYS_ioctl) {
            n = put(line, n, cap, ", fd ");
            n = put_num(line, n, cap, (unsigned long)uc->uc_mcontext.gregs[REG_RDI], 10);
            n = put(line, n, cap, ", request ");
            n = put_num(line, n, cap,
                        (unsigned long)uc->uc_mcontext.gregs[REG_RSI] & 0xffffffffu, 16);
        }
    }
    n = put(line, n, cap, "; stopping the VMM (exit status ");
    n = put_num(line, n, cap, (unsigned)exit_status, 10);
    n = put(line, n, cap, ")\n");
    (void)!write(report_fd, line, n);

    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction)
            previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    }
    _exit(exit_status);
}

static PyObject *install(PyObject *self, PyObject *args)
{
    PyObject *table;
    int status, fd;
    struct sigaction action;

    if (!PyArg_ParseTuple(args, "O!ii", &PyTuple_Type, &table, &status, &fd))
        return NULL;
    if (names == NULL) {
        Py_ssize_t count = PyTuple_GET_SIZE(table);
        char **copy = PyMem_RawCalloc(count ? count : 1, sizeof *copy);
        if (copy == NULL)
            return PyErr_NoMemory();
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *item = PyTuple_GET_ITEM(table, i);
            if (item == Py_None)
                continue;
            const char *s = PyUnicode_AsUTF8(item);
            if (s == NULL || (copy[i] = strdup(s)) == NULL) {
                for (Py_ssize_t j = 0; j < i; j++)
                    free(copy[j]);
                PyMem_RawFree(copy);
                return s == NULL ? NULL : PyErr_NoMemory();
            }
        }
        names = copy;
        n_names = count;
    }
    exit_status = status;
    report_fd = fd;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigsys;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigfillset(&action.sa_mask);  /* nothing interrupts the report */
    struct sigaction old;
    if (sigaction(SIGSYS, &action, &old) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (old.sa_sigaction != on_sigsys)
        previous = old;
    Py_RETURN_NONE;
}

static PyObject *installed(PyObject *self, PyObject *unused)
{
    struct sigaction current;
    if (sigaction(SIGSYS, NULL, &current) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigsys);
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(names, exit_status, fd): report SIGSYS from seccomp on fd, then _exit.\n"
     "names[nr] is the name of syscall nr (None if unknown). The SIGSYS action found\n"
     "(faulthandler's, registered first) is called after the line, for the traceback."},
    {"installed", installed, METH_NOARGS, "Whether the reporter is the SIGSYS action."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sigsys", "The seccomp sandbox's SIGSYS reporter.", -1, methods,
};

PyMODINIT_FUNC PyInit__sigsys(void)
{
    return PyModule_Create(&module);
}
