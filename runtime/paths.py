"""Paths under the data root: nothing a request names may lead outside it, by name or by link.

The daemon reads recordings and writes scans under ``daemon.data_root`` only. Local users
who may put files there must not be able to use it as a door to the rest of the file system:

* a path parameter is resolved against the data root and refused if it lands outside it
  (:func:`resolve_under`);
* a recording is walked before it is scanned (:func:`check_tree_within`): every file and
  folder in it, and every symbolic link's target, must lie inside the data root, so a
  ``stacks/`` that links to someone else's data is refused instead of read;
* a scan's output folder must be new, or an existing empty real folder of the daemon's user,
  which is then closed to group and others (:func:`make_output_folder`): never a link, an
  earlier scan, a recording, or a folder that someone pre-seeded with files;
* files in it are created exclusively and without following links (:func:`create_exclusive`),
  and finished by a rename within the folder (:func:`write_file_exclusive`): a pre-seeded
  ``report.json.partial -> /elsewhere`` is unlinked (which removes the link, not its target)
  and the write goes to a new file, never through the link.

Errors are :class:`UnsafePath` (a ``ValueError``) whose message names the parameter and the
offending path; the supervisor answers them with ``invalid_params``.

What this does not cover: a user who may *rename* entries of the data root can still swap a
checked folder for a link between the check and the use. Keep the data root writable by the
daemon's user only (the systemd unit's ``StateDirectoryMode=0750``) and let others hand over
recordings through a folder they can write and the daemon can only read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_TREE_DEPTH",
    "MAX_TREE_ENTRIES",
    "UnsafePath",
    "check_output_folder",
    "check_tree_within",
    "create_exclusive",
    "folder_identity",
    "is_within",
    "make_output_folder",
    "output_folder",
    "resolve_under",
    "write_file_exclusive",
]

MAX_TREE_ENTRIES: Final = 1_000_000
"""Most files and folders :func:`check_tree_within` looks at (a 200 x 150 field, 9-plane recording
has ~300 000); a bigger tree is refused rather than checked for minutes while the daemon waits."""

MAX_TREE_DEPTH: Final = 64
"""Deepest folder nesting :func:`check_tree_within` follows (a Zarr v3 recording needs ~8)."""

_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """A path cannot be used without leaving the data root or writing through a link; the message says why."""


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """``path`` is ``root`` or below it -- lexically: pass both already resolved (``os.path.realpath``)."""
    p, r = os.fspath(path), os.fspath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def resolve_under(root: str | os.PathLike[str], value: str, param: str) -> Path:
    """Resolve a path parameter against ``root`` and refuse anything outside it.

    Relative paths are taken relative to ``root``; absolute ones must already lie inside it.
    Symlinks are resolved first, so a link pointing out of the data root is refused too (only
    the path itself: :func:`check_tree_within` checks what lies below it).
    """
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / value).resolve()
    if not candidate.is_relative_to(root_resolved):
        raise UnsafePath(f"{param}: {value!r} is outside the data root {root_resolved}")
    return candidate


def check_tree_within(
    top: str | os.PathLike[str],
    root: str | os.PathLike[str],
    param: str,
    *,
    max_entries: int = MAX_TREE_ENTRIES,
    max_depth: int = MAX_TREE_DEPTH,
) -> int:
    """Check that everything a reader of ``top`` could open lies inside ``root``; returns the entries seen.

    Walks ``top`` without following links on the way down; each symbolic link is resolved only
    to check where it leads: a target outside ``root`` is refused, as are broken or looping
    links, and anything that is neither a regular file nor a folder (a FIFO would hang the
    reader, a device node is no recording). A link to a folder *inside* ``root`` is walked as
    well (a reader going through the link reads what lies behind it), each folder once however
    many links lead to it, so a link back up the tree is no loop. At most ``max_entries``
    entries and ``max_depth`` levels are looked at; a bigger tree is refused.
    """
    root_real = os.path.realpath(root)
    top_real = os.path.realpath(top)
    if not is_within(top_real, root_real):
        raise UnsafePath(f"{param}: {os.fspath(top)} leads outside the data root {root_real} (to {top_real})")
    try:
        st = os.stat(top_real)
    except OSError as err:
        raise UnsafePath(f"{param}: cannot read {top_real}: {err.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return 1
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{param}: {top_real} is neither a file nor a folder")
    seen = {(st.st_dev, st.st_ino)}
    todo = [(top_real, 0)]
    count = 0
    while todo:
        folder, depth = todo.pop()
        try:
            entries = os.scandir(folder)
        except OSError as err:
            raise UnsafePath(f"{param}: cannot read {folder}: {err.strerror}") from None
        with entries:
            for entry in entries:
                count += 1
                if count > max_entries:
                    raise UnsafePath(
                        f"{param}: {top_real} holds more than {max_entries} files and folders; not checked further"
                    )
                where = entry.path
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not is_within(target, root_real):
                        raise UnsafePath(
                            f"{param}: {entry.path} is a symbolic link to {target}, outside the data root {root_real}"
                        )
                    try:
                        st = os.stat(entry.path)
                    except OSError as err:
                        raise UnsafePath(
                            f"{param}: {entry.path} is a broken or looping symbolic link ({err.strerror})"
                        ) from None
                    where = target
                    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = not is_dir and entry.is_file(follow_symlinks=False)
                    if is_dir:
                        st = entry.stat(follow_symlinks=False)
                if is_dir:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    if depth + 1 > max_depth:
                        raise UnsafePath(f"{param}: {entry.path} is nested more than {max_depth} folders deep")
                    seen.add(key)
                    todo.append((where, depth + 1))
                elif not is_file:
                    raise UnsafePath(f"{param}: {entry.path} is neither a file nor a folder")
    return count


def _contents(path: Path, names: list[str]) -> str:
    if "report.json" in names:
        return f"{path} already holds a scan (report.json)"
    if "zarr.json" in names:
        return f"{path} holds a recording (zarr.json)"
    names = sorted(names)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{path} is not empty ({shown})"


_NEW_OR_EMPTY: Final = "scans are written only into a new or empty folder"


def check_output_folder(path: str | os.PathLike[str], param: str) -> bool:
    """Can scan outputs go to ``path``? False: it does not exist yet; True: it is an existing empty
    real folder of this user's. Anything else -- a symbolic link, a file, a folder with anything
    in it (an earlier scan, a recording, pre-seeded files), someone else's folder -- raises
    :class:`UnsafePath`. Only looks: :func:`make_output_folder` makes or claims the folder."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{param}: {path} is a symbolic link; {_NEW_OR_EMPTY}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{param}: {path} exists and is not a folder; {_NEW_OR_EMPTY}")
    try:
        names = os.listdir(path)
    except OSError as err:
        raise UnsafePath(f"{param}: cannot read {path}: {err.strerror}") from None
    if names:
        raise UnsafePath(f"{param}: {_contents(path, names)}; {_NEW_OR_EMPTY}")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{param}: {path} belongs to another user (uid {st.st_uid}); {_NEW_OR_EMPTY}")
    return True


def output_folder(root: str | os.PathLike[str], name: str, param: str) -> Path:
    """``root/name`` with ``root`` resolved and ``name`` not: the folder itself may be a link (and is then refused)."""
    if not name or name in (".", "..") or os.sep in name or "\x00" in name:
        raise UnsafePath(f"{param}: {name!r} is not a plain folder name")
    return Path(os.path.realpath(root)) / name


def make_output_folder(root: str | os.PathLike[str], name: str, param: str) -> Path:
    """The scan folder ``root/name``, made now (``os.mkdir``: never through a link) or claimed.

    An existing folder must pass :func:`check_output_folder`; it is then opened without
    following links, made unwritable for group and others (so nothing can be planted in it from
    now on) and checked to be empty once more. ``name`` must be one plain path component.
    """
    path = output_folder(root, name, param)
    try:
        os.mkdir(path, 0o755)
        return path
    except FileExistsError:
        pass
    check_output_folder(path, param)
    try:
        dfd = os.open(path, _DIR_FLAGS)
    except OSError as err:  # replaced by a link or a file since the check
        raise UnsafePath(f"{param}: cannot open {path} as a folder ({err.strerror}); {_NEW_OR_EMPTY}") from None
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"{param}: {path} belongs to another user (uid {st.st_uid}); {_NEW_OR_EMPTY}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.fchmod(dfd, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        names = os.listdir(dfd)
        if names:
            raise UnsafePath(f"{param}: {_contents(path, names)}; {_NEW_OR_EMPTY}")
    finally:
        os.close(dfd)
    return path


def folder_identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(device, inode) of the real folder ``path`` (not a link), to tell later that it is still the same."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{os.fspath(path)} is not a folder (a symbolic link or a file)")
    return st.st_dev, st.st_ino


def create_exclusive(
    path: str | os.PathLike[str], *, replace_stale: bool = False, mode: int = 0o666, dir_fd: int | None = None
) -> int:
    """A new file at ``path``, opened for writing: ``O_CREAT | O_EXCL | O_NOFOLLOW``; returns the fd.

    Never writes through a link nor into an existing file. With ``replace_stale``, whatever is at
    ``path`` (a partial file from a crash, a planted link) is unlinked first -- that removes the
    link itself, not its target; if something reappears there before the open, the open fails.
    """
    if replace_stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
    return os.open(path, _CREATE_FLAGS, mode, dir_fd=dir_fd)


def write_file_exclusive(
    folder: str | os.PathLike[str], name: str, data: bytes, *, folder_id: tuple[int, int] | None = None
) -> Path:
    """Write ``folder/name`` as ``folder/name.partial`` (see :func:`create_exclusive`), then rename it
    within the folder -- replacing whatever ``name`` was, a link included, never its target.

    The folder is opened without following a link and the file operations are relative to it;
    with ``folder_id`` (from :func:`folder_identity`) it must still be that same folder.
    """
    if os.sep in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain file name")
    dfd = os.open(folder, _DIR_FLAGS)
    try:
        if folder_id is not None:
            st = os.fstat(dfd)
            if (st.st_dev, st.st_ino) != folder_id:
                raise UnsafePath(f"{os.fspath(folder)} was replaced by another folder; not writing {name} there")
        tmp = name + ".partial"
        fd = create_exclusive(tmp, replace_stale=True, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return Path(folder) / name
