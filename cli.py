"""What the command-line scripts share: one-line errors, range-checked flags, the flags several
scripts take, atomic file writes and worker processes. Every script reports bad input as one line,
`error: <what> <what to do>`, and exits with 2: argparse's errors (ArgumentParser) and every Error
raised (main): UsageError, DataError, CheckpointError, and workdir.py's WorkDirError and
TrainingError."""

import argparse
import contextlib
import errno
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


class Error(Exception):
    """What a user can fix: the message names the file or flag and what to do."""

    exit_code = 2


class UsageError(Error):
    """A flag or environment that cannot work. The message names the flag and the fix."""


class DataError(Error):
    """Bad input data. The message names the file and the fix."""

    def __str__(self):
        # DataLoader workers re-raise with their traceback prepended; the message is the last line.
        return re.sub(r"^[\w.]*DataError: ", "", super().__str__().strip().splitlines()[-1])


class CheckpointError(Error):
    """A weights file that cannot be used. The message names the file and what was wrong."""


def main(run, *args):
    """Runs run(*args) as a script does: an Error (its exit code), running out of memory or a dead
    loader process (1: no input's fault) ends it with one line, `error: <message>`, killing every
    process it started: the exit would SIGTERM them and wait forever for loader workers."""
    try:
        return run(*args)
    except Error as e:
        code, text = e.exit_code, f"error: {e}"
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError, a dead DataLoader worker
        code, text = 1, failure_text(e)
        if text is None:
            raise
    if hasattr(signal, "SIGCHLD"):  # torch's handler would call its workers' end an error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
    # any file name prints
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    sys.exit(code)


def failure_text(error):
    """The one line for running out of memory or a dead data loading process; None for others."""
    text = first_line(error, 200)
    oom = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
    if oom or "can't allocate memory" in text:
        fix = "lower --batch-size or --crop, or use --mode slide for very large images"
        return f"error: out of memory ({text}); {fix}"
    if "DataLoader worker" in text:
        fix = "lower --workers, then run the same command again (training: with --resume)"
        return f"error: {text} (killed, or out of memory); {fix}"


def first_line(error, limit=300):
    """An exception in one line: its message's first line that says something (not OpenVINO's
    `Exception from src/...:84:`, `Check '...' failed at src/...:887:`, nor torch's `Error(s) in
    loading state_dict for ...:`), or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    openvino = r"(Exception from|Check '.*' failed at) \S+:\d+:?"
    state_dict = r"Error\(s\) in loading state_dict for \w+:"
    telling = [line for line in lines if not re.fullmatch(f"{openvino}|{state_dict}", line)]
    return (telling or lines or [type(error).__name__])[0][:limit]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default, help text or not."""

    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return (action.help or "") + (" (default: %(default)s)" if shown else "")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the docstring as help, defaults shown, one-line errors (no usage block)."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} -h)\n")


DATASET_TYPES, DEVICES = ("auto", "cityscapes", "folder"), ("auto", "cpu", "cuda", "npu")


def add_data_flags(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default="data/cityscapes", help="the dataset's folder")
    layouts = "auto: from the data root (docs/your-data.md)"
    group.add_argument("--dataset", default="auto", choices=DATASET_TYPES, help=layouts)


def add_device_flags(parser):
    """Where and in which precision a script computes (device.py: what each choice means where)."""
    group = parser.add_argument_group("device")
    auto = "auto: an Ascend NPU, else a CUDA GPU, else the CPU"
    group.add_argument("--device", default="auto", choices=DEVICES, help=auto)
    group.add_argument(
        "--device-id", "--gpu-id", type=integer(0), default=0, help="single-device runs"
    )
    amp = "O1 = apex O1 (half-precision convolutions); O0 = fp32"
    group.add_argument("--amp", "--opt-level", default="O1", choices=("O0", "O1"), help=amp)
    precision = "O1's half precision; auto: as docs/training.md says (Precision)"
    dtypes = ("auto", "float16", "bfloat16")
    group.add_argument("--amp-dtype", default="auto", choices=dtypes, help=precision)


def _checked(name, convert, ok, expectation):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {expectation}")
        return value

    parse.__name__ = name
    return parse


def integer(low, high=None):
    """An int in [low, high]."""
    expectation = f">= {low}" if high is None else f"between {low} and {high}"
    high = math.inf if high is None else high
    return _checked("an integer", int, lambda v: low <= v <= high, expectation)


def real(low=None, high=None, low_open=False, high_open=False):
    """A finite float in the interval given (open or closed at each end)."""

    def ok(v):
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return math.isfinite(v) and above and below

    lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high}"
    expectation = "a finite number " + " and ".join(filter(None, (lower, upper)))
    return _checked("a number", float, ok, expectation)


def size(text):
    """'HxW' -> (H, W), both >= 1."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 1024x2048") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be >= 1, e.g. 1024x2048")
    return h, w


def ratios(count=None):
    """Comma-separated positive ratios, e.g. '0.5,2.0' -> (0.5, 2.0); count: how many must be."""

    def parse(text):
        with contextlib.suppress(ValueError):
            values = tuple(float(v) for v in text.split(","))
            if count in (None, len(values)) and all(math.isfinite(v) and v > 0 for v in values):
                return values
        how_many = f"{count} " if count else ""
        example = "0.5,2.0" if count == 2 else "0.75,1.0,1.25"
        expected = f"expected {how_many}comma-separated positive numbers, e.g. {example}"
        raise argparse.ArgumentTypeError(f"{text!r}: {expected}")

    parse.__name__ = "ratios"
    return parse


# -- Files: what a script writes appears whole or not at all ---------------------------------------
def publish_new(temp, path, *, keep_both=False):
    """temp becomes `path`, returned, only if no file is there (a link fails on an existing name): a
    file that appeared meanwhile is kept, FileExistsError, or with keep_both NAME_2, NAME_3, ..."""
    path = Path(path)
    numbers = range(2, 1000) if keep_both else ()
    for candidate in [path, *(path.with_name(f"{path.stem}_{n}{path.suffix}") for n in numbers)]:
        with contextlib.suppress(FileExistsError):
            os.link(temp, candidate)
            return candidate
    appeared = "a file of that name appeared while this run wrote it; it was kept"
    raise FileExistsError(errno.EEXIST, appeared, str(path))


class atomic_write:
    """`with atomic_write(path) as temp:` yields a temporary path beside `path`; when the block ends
    it becomes `path` in one step, replacing the old file, or with replace=False never (publish_new,
    keep_both). .path is where it went. On any failure the temporary file is removed."""

    def __init__(self, path, *, replace=True, keep_both=False, suffix=".tmp"):
        self.path, self.replace, self.keep_both = Path(path), replace, keep_both
        self.suffix = suffix

    def __enter__(self):
        """A new file beside `path` with the permissions open() gives (mkstemp's are owner-only)."""
        prefix, folder = f".{self.path.name}.", self.path.parent
        handle, temp = tempfile.mkstemp(prefix=prefix, suffix=self.suffix, dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.close(handle)
        os.chmod(temp, 0o666 & ~umask)
        self.temp = Path(temp)
        return self.temp

    def __exit__(self, error_type, error, traceback):
        try:
            if error_type is None and self.replace:
                os.replace(self.temp, self.path)
            elif error_type is None:
                self.path = publish_new(self.temp, self.path, keep_both=self.keep_both)
        finally:
            self.temp.unlink(missing_ok=True)


def sync_directory(directory):
    """Makes a rename in `directory` durable: without it a power loss can undo the rename after the
    old file went. Windows cannot open a folder as a file, and its renames need no such step."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_context():
    """Worker processes come from a fresh single-threaded server (forkserver), never a fork of this
    process: a fork copies any lock another thread (torch's, a test runner's) holds at that moment,
    and a worker that then waits on it waits forever. Windows has spawn only: no fork to fear."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def process_pool(processes):
    """A multiprocessing Pool (process_context). Its workers keep SIGTERM's default: leaving the
    `with` block stops them with it, and a worker that ignored it would be waited for forever."""
    return process_context().Pool(processes)


class WorkerDied(Error):
    exit_code = 1  # not the input's fault: a rerun with fewer processes may pass


def process_map(function, jobs, processes, what):
    """function(job) for each job, in order, in `processes` processes (process_context). A process
    that dies (killed, a decoder crashed) ends it with one line, where a Pool waits forever."""
    if processes < 2:
        yield from map(function, jobs)
        return
    try:
        with ProcessPoolExecutor(processes, mp_context=process_context()) as pool:
            yield from pool.map(function, jobs, chunksize=8)
    except BrokenProcessPool:
        crashed = "killed, out of memory, or a decoder crashed on one of its files"
        died = f"a process reading {what} died ({crashed})"
        raise WorkerDied(f"{died}; run it again, with fewer processes") from None
