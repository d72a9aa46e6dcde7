"""How Wyrd runs on this machine: the thread policy, the allocator, and atomic files.

autograd.py imports this module first, so every program gets the policy before
NumPy loads OpenBLAS (the thread settings are read once, at that moment). A
script that imports NumPy itself must import autograd, wyrd, train or chat first.
"""
import contextlib
import ctypes
import os
import sys

# Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores. By
# default both spin for a while after each parallel region, stealing the core the
# other needs next: a training step measured 2-4x slower. Numba's threads sleep.
# Except when decoding with int8 weights (chat.py --quantize): its matrix-vector
# products are ~65 Numba loops a token while BLAS is idle, and waking a sleeping
# thread for each costs ~50 us, so its threads spin briefly.
DECODING = os.path.basename(sys.argv[0]) in ("chat.py", "bench_chat.py")
INT8_DECODING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}
if DECODING and any(a.startswith("--q") for a in sys.argv):  # argparse also takes --quant, --q=int8
    for k, v in INT8_DECODING.items():
        os.environ.setdefault(k, v)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Where SciPy is installed, Numba's first compile imports SciPy's BLAS wrappers (for
# np.dot inside jitted code, which no Wyrd kernel has): 16 MB more in a chat process,
# 4% of one with int8 weights. Chat never uses SciPy, so it is marked absent there.
if DECODING:
    sys.modules.setdefault("scipy", None)

# How long OpenBLAS threads spin after a call before they sleep. Decoding (chat.py)
# runs ~110 small matrix-vector products per token with only small one-thread
# kernels between them: threads kept awake made medium decoding ~12% faster.
# Training runs a few large products with long Numba kernels between them, where
# spinning BLAS threads steal the cores (tiny ~4% slower). The value is read once,
# so the program being run decides.
DECODE_BLAS_TIMEOUT, TRAIN_BLAS_TIMEOUT = "20", "4"
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", DECODE_BLAS_TIMEOUT if DECODING else TRAIN_BLAS_TIMEOUT)


def _keep_freed_memory():
    """glibc serves large arrays with fresh mmap pages and unmaps them on free, so a
    training step re-faults every activation it allocates: on a 2-core VM that was
    10-35% of the step (tiny: 60 ms of 490; medium: 1 s of sys time per step). Ask
    malloc to serve them from its heap and keep freed memory for the next step.
    Linux/glibc only; elsewhere this does nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # glibc before 2.35ish caps the mmap threshold at 32 MiB; fixing the trim threshold
    # alone would freeze malloc's own adaptive thresholds and make things worse
    if mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20):
        mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


_keep_freed_memory()


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write a file so that a reader (or a run killed at any instant) sees the old
    file or the new one, never part of one: yields `path.tmpPID` open in `mode`;
    on a clean exit it is flushed, fsynced and renamed over `path`, on an error
    removed. Every file Wyrd writes goes through here. An error of the write itself
    (a full disk, a file-size limit) names `path`, never the temporary.

        with atomic_write("x.json", "w") as f:
            f.write(text)
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # write() and fsync() raise without a file name, open() and replace() name the
        # temporary; the caller's own errors (reading a source) name their file and pass
        if e.errno is not None and e.filename in (None, tmp):
            raise type(e)(e.errno, e.strerror, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(path):
    """Delete `path.tmpPID` files that atomic_write left when its process was killed
    (their PID is gone); a live process's temporary is left alone."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".tmp"
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet: nothing left behind
        return
    for name in names:
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isascii() and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):  # another run removed it first
                    os.remove(os.path.join(folder, name))
            except (OSError, OverflowError):
                pass  # alive, not ours to ask about, or no PID at all (too large): leave it
