"""Content checksums of checkpoint files: computed from the bytes as they are written, checked before a load.

The manifest already records each file's size; a checksum also catches damage that keeps the size (bytes
overwritten in place). The fastest algorithm importable is used (``crc32c``, ``xxhash``), else ``zlib.crc32``
from the standard library; the manifest names it, so a reader without that module says so instead of guessing.
"""

import zlib

CHUNK = 1 << 22  # 4 MiB reads when a file is checked


class _Crc:
    """A running CRC-32 of any implementation ``update(data, value) -> value`` (zlib's, crc32c's)."""

    def __init__(self, name, function):
        self.name, self._function, self.value = name, function, 0

    def update(self, data):
        self.value = self._function(data, self.value)

    def hexdigest(self):
        return f"{self.value:08x}"


class _Xxh64:
    name = "xxh64"

    def __init__(self):
        import xxhash
        self.state = xxhash.xxh64()

    def update(self, data):
        self.state.update(data)

    def hexdigest(self):
        return self.state.hexdigest()


def _algorithms():
    """Name -> a factory of running checksums, for the algorithms this interpreter can import."""
    found = {"crc32": lambda: _Crc("crc32", zlib.crc32)}
    try:
        import crc32c
        found["crc32c"] = lambda: _Crc("crc32c", crc32c.crc32c)
    except ImportError:
        pass
    try:
        import xxhash  # noqa: F401
        found["xxh64"] = _Xxh64
    except ImportError:
        pass
    return found


ALGORITHMS = _algorithms()
PREFERRED = next(name for name in ("crc32c", "xxh64", "crc32") if name in ALGORITHMS)


def new(algorithm: str = PREFERRED):
    return ALGORITHMS[algorithm]()


class HashingWriter:
    """A binary file that hashes what passes through it: ``torch.save`` writes through it, so the checksum
    costs no second read. No ``fileno``: torch would write storages to the descriptor, past the hash."""

    def __init__(self, file, algorithm: str = PREFERRED):
        self.file, self.hash, self.size = file, new(algorithm), 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


def of_file(path: str, algorithm: str = PREFERRED) -> str:
    """``"<algorithm>:<hex>"`` of the file at ``path``."""
    digest = new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return f"{digest.name}:{digest.hexdigest()}"


def algorithm_of(recorded: str) -> str:
    return recorded.split(":", 1)[0]
