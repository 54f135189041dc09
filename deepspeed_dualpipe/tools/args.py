"""Argument types of ``python -m deepspeed_dualpipe``: a bad value is refused by argparse before any work,
with one line naming the option and what it takes (exit status 2), never a traceback from deep inside."""

import argparse
import os
import sys

# The largest schedule the analysis commands (schedule, simulate, verify, plot) take: P ranks x M micro-batches.
# They are linear in the instructions (about 12 P M of them per schedule); this bound keeps one schedule to
# seconds and under 1 GiB on one core (docs/troubleshooting.md has the figures).
MAX_STAGES = 64
MAX_MICRO_BATCHES = 4096
MAX_STAGE_MICRO_BATCHES = 16 * 1024  # P x M


class OneLineParser(argparse.ArgumentParser):
    """``parser.error`` in one line: ``prog: error: message`` on stderr, exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text, what):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None


def positive_int(text) -> int:
    value = _integer(text, "expected 1 or more")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count (expected 1 or more)")
    return value


def positive_float(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number")
    return value


def stages(text) -> int:
    value = positive_int(text)
    if value > MAX_STAGES:
        raise argparse.ArgumentTypeError(f"{value} pipeline ranks: the analysis takes at most {MAX_STAGES}")
    return value


def micro_batches(text) -> int:
    value = positive_int(text)
    if value > MAX_MICRO_BATCHES:
        raise argparse.ArgumentTypeError(f"{value} micro-batches: the analysis takes at most {MAX_MICRO_BATCHES}")
    return value


def check_size(parser, P, M) -> None:
    """P x M within what the analysis commands take (each alone is checked by its type)."""
    if P is not None and M is not None and P * M > MAX_STAGE_MICRO_BATCHES:
        parser.error(f"-P {P} x -M {M} = {P * M} stage-micro-batches: the analysis takes at most "
                     f"{MAX_STAGE_MICRO_BATCHES} (e.g. P=64 with M up to {MAX_STAGE_MICRO_BATCHES // 64}, or "
                     f"P={MAX_STAGE_MICRO_BATCHES // MAX_MICRO_BATCHES} with M up to {MAX_MICRO_BATCHES})")


def name_list(text) -> str:
    """A comma-separated list with at least one name (checked against the schedules by the command)."""
    if not [n for n in str(text).split(",") if n.strip()]:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing (expected comma-separated names)")
    return text


def stage_list(text):
    """Comma-separated pipeline depths, each 2..MAX_STAGES."""
    values = [t for t in str(text).split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no pipeline depth (expected e.g. 2,4,8)")
    result = []
    for t in values:
        value = stages(t)
        if value < 2:
            raise argparse.ArgumentTypeError(f"{value} pipeline ranks: a pipeline has 2 or more")
        result.append(value)
    return result


def existing_file(text) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(
            f"{text}: no such file" if not os.path.exists(text) else f"{text} is not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be read (permissions)")
    return text


def existing_path(text) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def writable_file(text) -> str:
    """An output file whose directory exists and can be written (the file itself is created or replaced)."""
    directory = os.path.dirname(os.path.abspath(text)) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory (expected a file name)")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{text}: its directory {directory} does not exist (create it first)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: its directory {directory} cannot be written")
    return text


def writable_dir(text) -> str:
    """An output directory: existing and writable, or creatable under an existing writable parent."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {path} cannot be written")
    return text


def fail(message: str) -> None:
    """The one-line answer to a bad input found after parsing (exit status 2)."""
    print(f"python -m deepspeed_dualpipe: error: {message}", file=sys.stderr)
    raise SystemExit(2)
