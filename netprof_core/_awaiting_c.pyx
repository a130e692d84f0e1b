# cython: language_level=3, embedsignature=True
"""``awaiting``: an awaitable that awaits another and then reports how it
ended. The C twin of ``_awaiting_py.py``.

The async hooks return one where an ``async def`` wrapper would put a
coroutine of ours in the request's await chain. That coroutine, and the
exceptions that carry its result, are most of what an async hook costs; this
object is stepped through C slots (``am_send``, ``tp_iternext``) and passes
each step and the result along without raising anything of its own.
"""

cimport cython
from cpython.object cimport PyObject

from types import CoroutineType

from netprof_core.log import logger


cdef extern from "Python.h":
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(PyObject* iterator, PyObject* arg, PyObject** presult)
    void PyErr_Fetch(PyObject** type, PyObject** value, PyObject** traceback)
    void PyErr_NormalizeException(PyObject** type, PyObject** value, PyObject** traceback)
    void PyErr_Restore(PyObject* type, PyObject* value, PyObject* traceback)
    int PyException_SetTraceback(PyObject* exc, PyObject* traceback)
    void decref "Py_DECREF"(PyObject* reference)


cdef extern from *:
    """
    typedef PySendResult (*np_sendfunc)(PyObject *, PyObject *, PyObject **);

    /* Cython gives a class no am_send and its own tp_iternext: put ours in. */
    static void np_set_step_slots(PyObject *type, np_sendfunc send, iternextfunc next) {
        ((PyTypeObject *)type)->tp_as_async->am_send = send;
        ((PyTypeObject *)type)->tp_iternext = next;
    }

    /* Ends a tp_iternext with result `value` (a reference it takes), as a
       generator's return does: StopIteration(value), or nothing for None. */
    static PyObject *np_stop_iteration(PyObject *value) {
        if (value != Py_None) {
            if (PyTuple_Check(value) || PyExceptionInstance_Check(value)) {
                PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
                if (stop != NULL) {
                    PyErr_SetObject(PyExc_StopIteration, stop);
                    Py_DECREF(stop);
                }
            } else {
                PyErr_SetObject(PyExc_StopIteration, value);
            }
        }
        Py_DECREF(value);
        return NULL;
    }

    /* For a def function to hand on the error already set. */
    static PyObject *np_raised(void) { return NULL; }
    """
    ctypedef PySendResult (*np_sendfunc)(PyObject*, PyObject*, PyObject**)
    ctypedef PyObject* (*iternextfunc)(PyObject*)
    void np_set_step_slots(object type, np_sendfunc send, iternextfunc next)
    PyObject* np_stop_iteration(PyObject* value)
    object np_raised()


async def _delegate(awaitable):
    # Any other awaitable, through the interpreter's own await: its checks,
    # its errors, and a send, throw and close that the awaitable may lack.
    return await awaitable


def _unstarted():
    # Thrown into before its first step, a generator raises what it is given,
    # as an async def thrown into before its first step does.
    yield


def _report_failure():
    logger.error("netprof: an await's end could not be recorded", exc_info=True)


def awaiting(awaitable, on_end, context, start_ns):
    """An awaitable of ``awaitable``'s result that, once ``awaitable`` has
    returned or raised, calls ``on_end(context, result, None, start_ns)`` or
    ``on_end(context, None, exception, start_ns)``, once. The exception goes
    on unchanged; one raised by ``on_end`` is the hook's bug, logged, and never
    reaches the awaiting code. As with an ``async def``: closed or thrown into
    before its first step, it reports nothing; freed while suspended, it is
    closed, and reports the GeneratorExit."""
    cdef Awaiting pending = Awaiting.__new__(Awaiting)
    pending.steps = awaitable if type(awaitable) is CoroutineType else _delegate(awaitable)
    pending.on_end = on_end
    pending.context = context
    pending.start_ns = start_ns
    pending.started = False
    pending.over = False
    return pending


# No free list: the interpreter marks an object it has finalized for good,
# and a free list would hand it out again, marked, never to be finalized.
@cython.final
cdef class Awaiting:
    """One await in flight (see ``awaiting``)."""

    cdef object steps  # what is awaited: a coroutine, or _delegate() of another awaitable
    cdef object on_end
    cdef object context
    cdef object start_ns
    cdef bint started  # stepped at least once
    cdef bint over  # on_end has been called, or will never be

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        return self.send(None)

    def send(self, value):
        cdef PyObject* result = NULL
        cdef PySendResult status = awaiting_send(<PyObject*>self, <PyObject*>value, &result)
        if status == PYGEN_NEXT:
            return _taken(result)
        if status == PYGEN_RETURN:
            raise StopIteration(_taken(result))
        return np_raised()

    def throw(self, *exc_info):
        if not self.started:
            self._drop()
            return _unstarted().throw(*exc_info)
        try:
            return self.steps.throw(*exc_info)
        except StopIteration as stop:
            self._end(stop.value, None)
            raise
        except BaseException as exc:
            self._end(None, exc)
            raise

    def close(self):
        """Abandoned: reported with the GeneratorExit that closed it, as an
        ``async def`` wrapper would be (nothing, before its first step)."""
        if not self.started:
            self._drop()
            return
        try:
            self.steps.close()
        except BaseException as exc:
            self._end(None, exc)
            raise
        self._end(None, GeneratorExit())

    def __del__(self):
        # Freed while suspended (its task destroyed, say): closed, as the
        # interpreter closes a coroutine it frees. A finalizer (tp_finalize),
        # so that the cycle collector, which frees a destroyed task with all
        # it holds, runs it before it clears anything the report needs.
        if self.started and not self.over:
            try:
                self.close()
            except BaseException:
                _report_failure()

    cdef _drop(self):
        # Never stepped: what it would have awaited is closed unreported.
        self.over = True
        self.steps.close()

    cdef void _end(self, result, exc) noexcept:
        if self.over:
            return
        self.over = True
        try:
            self.on_end(self.context, result, exc, self.start_ns)
        except BaseException:
            _report_failure()


cdef object _taken(PyObject* reference):
    # An object for a new reference, without a second one.
    cdef object taken = <object>reference
    decref(reference)
    return taken


cdef PySendResult awaiting_send(PyObject* pending_object, PyObject* value, PyObject** result) noexcept:
    """am_send: one step of the awaited; on its end, on_end, and then the end passed on."""
    cdef Awaiting pending = <Awaiting>pending_object
    cdef PyObject* exc_type
    cdef PyObject* exc_value
    cdef PyObject* traceback
    cdef PySendResult status
    pending.started = True
    status = PyIter_Send(<PyObject*>pending.steps, value, result)
    if status == PYGEN_NEXT or pending.over:
        return status
    if status == PYGEN_RETURN:
        pending._end(<object>result[0], None)
        return status
    PyErr_Fetch(&exc_type, &exc_value, &traceback)
    PyErr_NormalizeException(&exc_type, &exc_value, &traceback)
    if exc_value == NULL:  # no exception after all: nothing to report it with
        PyErr_Restore(exc_type, exc_value, traceback)
        return status
    if traceback != NULL:
        PyException_SetTraceback(exc_value, traceback)
    pending._end(None, <object>exc_value)
    PyErr_Restore(exc_type, exc_value, traceback)
    return status


cdef PyObject* awaiting_next(PyObject* pending_object) noexcept:
    """tp_iternext: a step sending None, which is how an await steps."""
    cdef PyObject* result = NULL
    if awaiting_send(pending_object, <PyObject*>None, &result) == PYGEN_RETURN:
        return np_stop_iteration(result)
    return result  # what the awaited yielded, or NULL with its error set


np_set_step_slots(Awaiting, awaiting_send, awaiting_next)
