"""How Wyrd runs on this machine: the thread policy, the allocator, and atomic files.

The thread policy is one, for every program (training, chat, a script or notebook):
Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores, so both
sleep as soon as their work is done instead of spinning on a core the other needs
next (spinning made a training step 2-4x slower for Numba's threads, 12-25% for
OpenBLAS's). Decoding measured the same under spinning threads, so it has no policy
of its own (docs/results/bench_entry_*.md).

Any import order gives it. Numba's threads read their setting when the first parallel
kernel runs. OpenBLAS reads its own when NumPy loads: where NumPy was imported before
Wyrd, its thread pool is restarted here with the setting (Linux; elsewhere a note says
to set OPENBLAS_THREAD_TIMEOUT=4 before Python starts).
"""
import contextlib
import ctypes
import os
import sys

BLAS_TIMEOUT = "4"  # OpenBLAS's threads spin 2^4 cycles after a product before they sleep
_numpy_first = "numpy" in sys.modules and os.environ.get("OPENBLAS_THREAD_TIMEOUT") is None
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_TIMEOUT)


def _restart_blas_threads():
    """Make the OpenBLAS that NumPy loaded re-read its environment and stop its thread
    pool; its next product starts the pool again under the new setting. -> done?"""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]}
        libs = [ctypes.CDLL(p) for p in sorted(paths)]
    except OSError:  # not Linux, or the library cannot be opened by its path
        return False
    for lib in libs:  # none: NumPy's BLAS is not OpenBLAS, whose spin this is about
        if not (hasattr(lib, "openblas_read_env") and hasattr(lib, "blas_thread_shutdown_")):
            return False
        lib.openblas_read_env()
        lib.blas_thread_shutdown_()
    return True


if _numpy_first and not _restart_blas_threads():
    print("note: NumPy was imported before Wyrd, and its BLAS keeps its default thread spin, so "
          "training runs up to ~25% slower; set OPENBLAS_THREAD_TIMEOUT=4 before Python starts",
          file=sys.stderr)


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
