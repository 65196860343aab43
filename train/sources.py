"""Where the text comes from: the Python standard library's sources, a text file, or a folder of files."""
import dataclasses
import os
import pathlib
import sysconfig
import zlib
from collections.abc import Sequence

EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path) -> list[str]:
    """The `.py` files under root as sorted posix paths relative to it; no test folders, no site-packages."""
    found = []
    for folder, subfolders, names in os.walk(root):
        # pruning here also drops any venv or site-packages that happens to live under the stdlib
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]
        found += [pathlib.Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    return sorted(found)


def split_by_file(relpaths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) paths. A file's side depends on its own path only, so adding files never moves others.

    crc32, not hash(): Python salts str hashes per process and the split must never move.
    Both sides get at least one file, so needs two or more.
    """
    score = {p: zlib.crc32(p.encode()) / 2**32 for p in relpaths}
    n_val = min(max(sum(s < val_fraction for s in score.values()), 1), len(relpaths) - 1)
    val = set(sorted(relpaths, key=lambda p: (score[p], p))[:n_val])
    return [p for p in relpaths if p not in val], [p for p in relpaths if p in val]


@dataclasses.dataclass(frozen=True)
class Source:
    """The raw text of a corpus, file by file, before any tokenizer sees it."""

    name: str  # for the description
    files: tuple[tuple[str, bytes], ...]  # (relative path, contents), sorted, none empty
    by_file: bool  # split train/val by file; else by position (the tail is validation)


def read_source(path: str) -> Source:
    """The files data.path names: '' = the standard library, a text file, or a folder of text files."""
    if not path:
        root = stdlib_root()
        files = [(p, (root / p).read_bytes()) for p in stdlib_files(root)]
        return _nonempty(path, Source(f"the Python standard library ({root})", tuple(files), True))
    found = pathlib.Path(path).expanduser()
    if found.is_file():
        return _nonempty(path, Source(str(found), ((found.name, found.read_bytes()),), False))
    if not found.is_dir():
        raise FileNotFoundError(f"data.path={path!r} does not exist; point it at a text file, a "
                                f"folder of text files, or a folder with train.bin and val.bin "
                                f"('' = Python's standard library)")
    files = [(p.relative_to(found).as_posix(), p.read_bytes()) for p in _folder_files(found)]
    source = _nonempty(path, Source(str(found), tuple(files), True))
    return dataclasses.replace(source, by_file=len(source.files) > 1)


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    # hidden names (.git, .DS_Store) are tooling, not text
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _nonempty(path: str, source: Source) -> Source:
    # empty files add nothing, and could leave a split empty
    files = tuple((p, raw) for p, raw in source.files if raw)
    if not files:
        raise ValueError(f"data.path={path!r}: no text found ({source.name} is empty); "
                         f"point data.path at some text")
    return dataclasses.replace(source, files=files)
