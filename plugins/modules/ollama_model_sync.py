#!/usr/bin/python
# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible's module layout puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ollama_model_sync
short_description: Give one Ollama instance its own verified copy of models from a host-level store
description:
  - Makes the models directory of one Ollama instance (its C(OLLAMA_MODELS)) hold exactly the listed models,
    taken from a host-level store that uses the same on-disk layout
    (C(manifests/<host>/<namespace>/<model>/<tag>) and C(blobs/sha256-<hex>)).
  - Only blobs and manifests that are missing or wrong are written. Each blob is written under a temporary
    name in C(<dest>/.herd-partial/), checked against the sha256 in its name, flushed to disk and renamed
    into C(<dest>/blobs/) in one step, so an interrupted run never leaves a blob with wrong content under
    its final name.
  - Manifests are written last, after every blob they reference is present and verified, so Ollama never
    sees a model whose blobs are missing.
  - Stale temporary files left by a killed or failed run (disk full, power loss) are removed and the work is
    redone on the next run.
  - A second run with the same arguments changes nothing.
version_added: "0.1.0"
author:
  - herd contributors
options:
  src:
    description:
      - The host-level model store (an Ollama models directory holding C(manifests/) and C(blobs/)).
      - Fill it with C(OLLAMA_MODELS=<src> ollama pull <name>) or by unpacking an offline model bundle.
    type: path
    required: true
  dest:
    description:
      - The models directory of one instance (the instance's C(OLLAMA_MODELS)). Created when missing.
    type: path
    required: true
  models:
    description:
      - Names of the models the instance must hold, as Ollama parses them
        (C(name), C(name:tag), C(namespace/name:tag), C(host/namespace/name:tag)).
      - A missing host means C(registry.ollama.ai), a missing namespace C(library), a missing tag C(latest).
    type: list
    elements: str
    required: true
  method:
    description:
      - How a blob gets into O(dest).
      - V(copy) writes a separate copy of the bytes (one independent copy per instance, separate disk I/O).
      - V(hardlink) links the store's file (no extra space; O(src) and O(dest) must be on one filesystem;
        the instance shares the inode, so O(owner), O(group) and O(mode) also apply to the store's file).
      - V(reflink) clones the file with the C(FICLONE) ioctl (copy-on-write, no extra space until written;
        needs a filesystem that can reflink, such as XFS with C(reflink=1) or Btrfs). On a filesystem that
        cannot, the module fails and names the filesystem; it never falls back to a copy silently.
      - Switching methods converges. A blob that is a hard link of the store is replaced by a copy when
        O(method=copy) or O(method=reflink), and a separate file is replaced by a link when O(method=hardlink).
    type: str
    choices: [copy, hardlink, reflink]
    default: copy
  prune:
    description:
      - Remove from O(dest) the manifests of models not listed in O(models), then every blob named
        C(sha256-<hex>) that no listed model references.
      - Files and folders that do not follow Ollama's naming are left alone.
    type: bool
    default: false
  verify:
    description:
      - Compute the sha256 of every blob this run writes and compare it with the digest in its name. On a
        mismatch the module fails, names the blob and writes nothing under its final name.
      - For V(copy) the digest is computed over the bytes read from the store while they are written;
        for V(reflink) over the clone; for V(hardlink) over the store's file before it is linked.
      - Blobs already in O(dest) are always checked by size against the manifest (cheap); a blob with the
        wrong size is replaced.
    type: bool
    default: true
  verify_existing:
    description:
      - Also compute the sha256 of every blob already present in O(dest) and replace the ones that do not
        match (a full audit; reads every byte of every listed model).
    type: bool
    default: false
  owner:
    description:
      - Owner of the files and folders the module writes in O(dest). Unset means the user running the module.
    type: str
  group:
    description:
      - Group of the files and folders the module writes in O(dest). Unset means that user's group.
    type: str
  mode:
    description:
      - Octal mode of the blob and manifest files, as a quoted string.
    type: str
    default: "0644"
  dir_mode:
    description:
      - Octal mode of the folders the module creates or manages in O(dest), as a quoted string.
    type: str
    default: "0755"
notes:
  - Ansible modules cannot stream progress to the controller. The module logs the start, progress (every
    GiB) and end of every large blob through the target's syslog or journal, and returns per-blob sizes,
    durations and rates in RV(blobs).
  - Run it while the instance is stopped or before it first starts. At start-up Ollama deletes blobs that
    no manifest references, which can race with a sync in progress (set C(OLLAMA_NOPRUNE=1) to stop that).
  - Only one sync per O(dest) runs at a time; a second one fails at once instead of waiting.
  - Links are never followed below O(src) and O(dest) (both may be writable by the account Ollama runs as while
    the module runs as root). Every folder is opened with C(O_NOFOLLOW|O_DIRECTORY) relative to its parent's fd,
    every file with C(O_NOFOLLOW), and owners and modes are set on the open fd.
  - In O(dest) a symbolic link or special file where the module expects its own folder or file (O(dest) itself,
    C(manifests), C(blobs), C(.herd-partial), a manifest path folder, a manifest, a blob) is removed, never followed,
    and written again; the module warns and lists it in RV(links_replaced). O(dest) itself stays a link when root
    owns the link and the folder holding it and no one else can write that folder.
  - In O(src) a symbolic link or special file fails the module, naming the path and the fix.
  - A blob or manifest in O(dest) with other hard links is replaced, not chowned.
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode).
    support: full
seealso:
  - module: ollama_model_info
"""

EXAMPLES = r"""
- name: Give instance 0 its own copy of the configured models
  ollama_model_sync:
    src: /var/lib/herd/store
    dest: /var/lib/herd/instances/0/models
    models:
      - qwen2.5:7b
      - nomic-embed-text
    owner: ollama
    group: ollama

- name: Link the models into every instance and drop models no longer configured
  ollama_model_sync:
    src: /var/lib/herd/store
    dest: "{{ item.models_dir }}"
    models: "{{ item.models }}"
    method: hardlink
    prune: true
  loop: "{{ ollama_instances }}"
  loop_control:
    label: "{{ item.name }}"

- name: Audit every existing blob and repair the ones that rotted
  ollama_model_sync:
    src: /var/lib/herd/store
    dest: /var/lib/herd/instances/1/models
    models: [llama3.1:8b]
    verify_existing: true
"""

RETURN = r"""
copied:
  description: Digests of the blobs written as new copies of the bytes (O(method=copy)).
  returned: always
  type: list
  elements: str
  sample: ["sha256:6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"]
linked:
  description: Digests of the blobs hard linked or reflinked (O(method=hardlink) or O(method=reflink)).
  returned: always
  type: list
  elements: str
  sample: []
bytes_copied:
  description: Bytes written as copies this run (0 for links and reflinks).
  returned: always
  type: int
  sample: 4683073184
repaired:
  description: Digests of blobs that were present in O(dest) but replaced (wrong size, wrong digest, or
    wrong method), with the reason.
  returned: always
  type: list
  elements: dict
  sample: [{"digest": "sha256:6a07...", "reason": "size 1048576 != 4683073184"}]
manifests_written:
  description: Manifest paths, relative to O(dest), that were written or rewritten.
  returned: always
  type: list
  elements: str
  sample: ["manifests/registry.ollama.ai/library/qwen2.5/7b"]
pruned_models:
  description: Model names whose manifests were removed from O(dest) (O(prune=true)).
  returned: always
  type: list
  elements: str
  sample: ["registry.ollama.ai/library/llama2:latest"]
pruned_blobs:
  description: Digests of blobs removed from O(dest) because no listed model references them.
  returned: always
  type: list
  elements: str
  sample: []
stale_removed:
  description: Temporary files left by an interrupted earlier run that were removed.
  returned: always
  type: list
  elements: str
  sample: ["sha256-6a07...-4242"]
links_replaced:
  description: Paths in O(dest) where a symbolic link or special file stood in place of the module's own folder or
    file; each was removed (never followed) and written again.
  returned: always
  type: list
  elements: str
  sample: ["/var/lib/herd/instances/0/models/manifests"]
models:
  description: Every listed model as it is in O(dest) after the run.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The name as given in O(models).
      type: str
    fullname:
      description: The fully qualified name (C(host/namespace/model:tag)).
      type: str
    manifest:
      description: Path of the manifest relative to O(dest).
      type: str
    id:
      description: sha256 of the manifest (the first 12 hex digits are the ID that C(ollama list) shows).
      type: str
    digests:
      description: Digests of the config and layer blobs of the model.
      type: list
      elements: str
    size:
      description: Total size of the model's blobs in bytes.
      type: int
blobs:
  description: One entry per blob this run wrote (or, in check mode, would write), for progress and audit.
  returned: always
  type: list
  elements: dict
  sample: [{"digest": "sha256:6a07...", "size": 4683073184, "action": "copy", "reason": "missing",
            "seconds": 21.4, "mib_per_s": 208.7}]
msg:
  description: A short human summary.
  returned: always
  type: str
  sample: "2 models: copied 3 blobs (4.4 GiB), linked 0, repaired 0, pruned 0 models and 0 blobs"
"""

import errno
import fcntl
import hashlib
import os
import re
import stat
import time

from ansible.module_utils.basic import AnsibleModule

# The collection's path when herd runs as the collection herd.herd; ansible.cfg's module_utils folder in a checkout.
try:
    from ansible_collections.herd.herd.plugins.module_utils.ollama_names import (
        full_name,
        name_from_parts,
        name_parts,
        parse_name,
    )
    from ansible_collections.herd.herd.plugins.module_utils.ollama_store import (
        BLOB_FILE_RE,
        PARTIAL_DIR,
        account_id,
        blob_filename,
        digest_from_filename,
        parse_manifest,
    )
except ImportError:
    from ansible.module_utils.ollama_names import full_name, name_from_parts, name_parts, parse_name
    from ansible.module_utils.ollama_store import (
        BLOB_FILE_RE,
        PARTIAL_DIR,
        account_id,
        blob_filename,
        digest_from_filename,
        parse_manifest,
    )

LOCK_NAME = ".lock"
CHUNK = 8 * 1024 * 1024
GIB = 1024 * 1024 * 1024
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
REFLINK_ERRNOS = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


class SyncError(Exception):
    """An error to report to the user as the module's failure message."""


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: names, manifests, plans
# ---------------------------------------------------------------------------------------------------------


def parse_octal_mode(value, option):
    if isinstance(value, int):
        raise SyncError(f'{option} must be a quoted octal string such as "0644", got the number {value}')
    if not re.match(r"^0?[0-7]{3,4}$", str(value)):
        raise SyncError(f'{option} must be an octal string such as "0644", got {value!r}')
    return int(str(value), 8)


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"


def decide_blob(blob, dest_stat, src_stat, method):
    """Decide what to do with one blob. Pure: takes os.stat results (or None when missing).

    Returns (action, reason) where action is None (keep) or the method to apply.
    """
    if dest_stat is None:
        return method, "missing"
    if dest_stat.st_size != blob["size"]:
        return method, f"size {dest_stat.st_size} != {blob['size']}"
    same_inode = (dest_stat.st_dev, dest_stat.st_ino) == (src_stat.st_dev, src_stat.st_ino)
    if method == "hardlink" and not same_inode:
        return method, "not a hard link of the store"
    if method != "hardlink" and same_inode:
        return method, "hard link of the store, a separate copy is wanted"
    if not same_inode and dest_stat.st_nlink > 1:
        # another name shares the inode (maybe a file outside dest): chown or chmod would change it too
        return method, f"has {dest_stat.st_nlink - 1} other hard link(s)"
    return None, ""


def mount_fstype(path, mountinfo_text):
    """Filesystem type and mount point holding path, from the text of /proc/self/mountinfo."""
    best = ("", "unknown")
    for line in mountinfo_text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 2 or len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        fstype = fields[sep + 1]
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best[1], best[0] or "/"


# ---------------------------------------------------------------------------------------------------------
# Filesystem work
#
# The store and the instance folders are writable by the ollama account (and, in container mode, by root inside
# the container), while this module runs as root. So below O(src) and O(dest) nothing is reached by path: every
# folder is opened with O_NOFOLLOW|O_DIRECTORY relative to the fd of its parent, every file with O_NOFOLLOW, and
# ownership and modes are set with fchown/fchmod on what was opened. A link is never followed.
# ---------------------------------------------------------------------------------------------------------

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a file is expected must not hang the run.
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _lstat_at(dir_fd, name):
    """lstat of name in the folder dir_fd (None when missing or when dir_fd is None)."""
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _kind(st):
    if st is None:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "special file"


def _open_dir_at(dir_fd, name):
    """fd of the folder name in dir_fd, opened without following a link; None when missing."""
    if dir_fd is None:
        return None
    try:
        return os.open(name, O_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _open_file_at(dir_fd, name):
    """(fd, fstat) of the regular file name in dir_fd, opened without following a link; None when missing.

    Raises OSError ELOOP for a link, and SyncError-free NotRegular for anything that is not a regular file.
    """
    if dir_fd is None:
        return None
    try:
        fd = os.open(name, O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(_kind(st))
    return fd, st


class NotRegular(Exception):
    """What was found where a regular file is expected (a folder, a FIFO, a device)."""


def _read_fd(fd):
    chunks = []
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _sha256_fd(fd):
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        h.update(chunk)
    return "sha256:" + h.hexdigest()


class Syncer:
    """Carries out a sync for one dest. All writes go through here so check mode can skip them."""

    def __init__(self, module, params):
        self.module = module
        self.check = module.check_mode
        self.src = os.path.abspath(params["src"])
        self.dest = os.path.abspath(params["dest"]).rstrip("/") or "/"
        if self.dest == "/":
            raise SyncError("dest must be a models folder, not /")
        self.method = params["method"]
        self.verify = params["verify"]
        self.verify_existing = params["verify_existing"]
        self.prune = params["prune"]
        self.mode = parse_octal_mode(params["mode"], "mode")
        self.dir_mode = parse_octal_mode(params["dir_mode"], "dir_mode")
        self.uid = self._account(params.get("owner"), "owner")
        self.gid = self._account(params.get("group"), "group")
        self.blobs_dir = os.path.join(self.dest, "blobs")
        self.manifests_dir = os.path.join(self.dest, "manifests")
        self.partial_dir = os.path.join(self.dest, PARTIAL_DIR)
        self.result = {
            "changed": False,
            "copied": [],
            "linked": [],
            "bytes_copied": 0,
            "repaired": [],
            "manifests_written": [],
            "pruned_models": [],
            "pruned_blobs": [],
            "stale_removed": [],
            "links_replaced": [],
            "models": [],
            "blobs": [],
        }
        self._lock_fd = None
        self._fds = []
        # fds of the trusted roots and of the folders below them, opened once without following links
        self.src_fd = self.src_blobs_fd = None
        self.dest_fd = self.blobs_fd = self.manifests_fd = self.partial_fd = None

    def close(self):
        self.unlock()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def _keep(self, fd):
        if fd is not None:
            self._fds.append(fd)
        return fd

    # -- ownership and modes ---------------------------------------------------------------------------

    @staticmethod
    def _account(value, kind):
        try:
            return account_id(value, kind)
        except KeyError as exc:
            raise SyncError(exc.args[0]) from None

    def _attrs_differ(self, st, mode):
        if (st.st_mode & 0o7777) != mode:
            return True
        if self.uid != -1 and st.st_uid != self.uid:
            return True
        return self.gid != -1 and st.st_gid != self.gid

    def _apply_attrs(self, fd, mode):
        """Owner, group and mode of what fd holds open (never a path: a link swapped in meanwhile is not followed)."""
        if self.uid != -1 or self.gid != -1:
            os.fchown(fd, self.uid, self.gid)
        os.fchmod(fd, mode)

    def fix_attrs(self, fd, mode):
        """Bring the open file or folder fd to the wanted owner/group/mode; return True when it changed (or would)."""
        if not self._attrs_differ(os.fstat(fd), mode):
            return False
        if not self.check:
            self._apply_attrs(fd, mode)
        return True

    # -- links found where herd expects its own folders and files ---------------------------------------

    def replace_link(self, dir_fd, name, path, kind):
        """Remove the entry name (a link or special file, never a folder) so herd writes its own; report it."""
        self.module.warn(
            f"ollama_model_sync: {path} was a {kind} where herd keeps its own "
            f"{'folder' if name in ('blobs', 'manifests', PARTIAL_DIR) else 'file or folder'}; it was removed "
            f"(never followed) and is written again. Something with write access to {self.dest} put it there: "
            f"check that host's Ollama instance"
        )
        self.result["links_replaced"].append(path)
        self.result["changed"] = True
        if not self.check:
            os.unlink(name, dir_fd=dir_fd)

    def ensure_dir_at(self, dir_fd, name, path, mode=None):
        """fd of the folder name in dir_fd, created when missing; a link there is replaced, never followed.

        Returns (fd or None in check mode when missing, changed).
        """
        mode = self.dir_mode if mode is None else mode
        st = _lstat_at(dir_fd, name)
        changed = False
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if stat.S_ISREG(st.st_mode):
                raise SyncError(f"{path} is a file where herd expects a folder; remove it by hand")
            self.replace_link(dir_fd, name, path, _kind(st))
            st = None
        if st is None:
            changed = True
            if self.check or dir_fd is None:
                return None, True
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        try:
            fd = os.open(name, O_DIR, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SyncError(
                    f"{path} was replaced by a {'link' if exc.errno == errno.ELOOP else 'file'} while herd worked "
                    f"on it; something with write access to {self.dest} is changing it: stop that host's Ollama "
                    f"instance and run again"
                ) from None
            raise
        self._keep(fd)
        return fd, self.fix_attrs(fd, mode) or changed

    # -- locking and stale temporaries -----------------------------------------------------------------

    def lock(self):
        self._lock_fd = os.open(
            LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.partial_fd
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SyncError(
                f"another model sync into {self.dest} is running (lock {PARTIAL_DIR}/{LOCK_NAME})"
            ) from None

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file releases the flock
            self._lock_fd = None

    def stale_temporaries(self):
        if self.partial_fd is None:
            return []
        return sorted(n for n in os.listdir(self.partial_fd) if n != LOCK_NAME)

    def remove_stale(self):
        for name in self.stale_temporaries():
            path = os.path.join(self.partial_dir, name)
            self.module.log(f"ollama_model_sync: removing stale temporary {path} left by an interrupted run")
            st = _lstat_at(self.partial_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise SyncError(f"unexpected folder {path}; remove it by hand")
            if not self.check:
                os.unlink(name, dir_fd=self.partial_fd)
            self.result["stale_removed"].append(name)

    def _tmp_name(self, name):
        return f"{name}-{os.getpid()}"

    # -- store --------------------------------------------------------------------------------------------

    def _store_link_error(self, path, kind):
        return SyncError(
            f"the model store {self.src} holds a {kind} at {path}; herd never follows links in a store "
            f"(the store belongs to the ollama account): remove {path} and fill the store again "
            f"('OLLAMA_MODELS={self.src} ollama pull <name>' or unpack the offline model bundle)"
        )

    def _store_dir(self, dir_fd, name, path):
        """fd of a folder in the store, never through a link (a link is an error); None when missing."""
        st = _lstat_at(dir_fd, name)
        if st is None:
            return None
        if not stat.S_ISDIR(st.st_mode):
            raise self._store_link_error(path, _kind(st))
        fd = _open_dir_at(dir_fd, name)
        if fd is None:
            return None
        return self._keep(fd)

    def _store_file(self, dir_fd, name, path):
        """(fd, stat) of a regular file in the store, never through a link; None when missing."""
        st = _lstat_at(dir_fd, name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise self._store_link_error(path, _kind(st))  # not even opened: a device node could act on open
        try:
            return _open_file_at(dir_fd, name)
        except NotRegular as exc:
            raise self._store_link_error(path, str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._store_link_error(path, "symbolic link") from None
            raise

    def open_src(self):
        """Open the store root (the path as given, links in it resolved: it is the administrator's path)."""
        try:
            self.src_fd = self._keep(os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            self.src_fd = None
        except NotADirectoryError:
            raise SyncError(f"model store {self.src} is not a folder") from None

    def load_models(self, names):
        """Read and check every wanted model in the store before anything is written."""
        self.open_src()
        manifests_fd = self._store_dir(self.src_fd, "manifests", os.path.join(self.src, "manifests"))
        if manifests_fd is None and names:
            raise SyncError(
                f"model store {self.src} has no manifests/ folder; fill it with "
                f"'OLLAMA_MODELS={self.src} ollama pull <name>' or unpack an offline model bundle into it"
            )
        models, missing, seen = [], [], set()
        for raw in names:
            try:
                parsed = parse_name(raw)
            except ValueError as exc:
                raise SyncError(str(exc)) from None
            parts = name_parts(parsed)
            rel = os.path.join("manifests", *parts)
            if rel in seen:
                continue
            seen.add(rel)
            path = os.path.join(self.src, rel)
            dir_fd = manifests_fd
            for i, part in enumerate(parts[:-1]):
                dir_fd = self._store_dir(dir_fd, part, os.path.join(self.src, "manifests", *parts[: i + 1]))
            opened = self._store_file(dir_fd, parts[-1], path)
            if opened is None:
                missing.append(f"{raw} ({full_name(parsed)}: no {rel})")
                continue
            fd, _st = opened
            try:
                raw_bytes = _read_fd(fd)
            finally:
                os.close(fd)
            try:
                blobs = parse_manifest(raw_bytes.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise SyncError(f"manifest {path} of model {raw} is not valid: {exc}; pull the model again") from None
            models.append(
                {
                    "name": raw,
                    "fullname": full_name(parsed),
                    "manifest": rel,
                    "parts": parts,
                    "bytes": raw_bytes,
                    "blobs": blobs,
                }
            )
        if missing:
            raise SyncError(
                f"model(s) missing from the store {self.src}: {'; '.join(missing)}. Put them there first: "
                f"'OLLAMA_MODELS={self.src} ollama pull <name>' against your registry or mirror, "
                f"or unpack an offline model bundle into {self.src}"
            )
        if not models:
            return models
        self.src_blobs_fd = self._store_dir(self.src_fd, "blobs", os.path.join(self.src, "blobs"))
        for model in models:
            for blob in model["blobs"]:
                name = blob_filename(blob["digest"])
                path = os.path.join(self.src, "blobs", name)
                opened = self._store_file(self.src_blobs_fd, name, path)
                if opened is None:
                    raise SyncError(
                        f"the store {self.src} is incomplete: model {model['name']} needs blob {blob['digest']} "
                        f"but {path} is missing; pull the model into the store again"
                    )
                fd, st = opened
                os.close(fd)
                if st.st_size != blob["size"]:
                    raise SyncError(
                        f"the store {self.src} is damaged: blob {path} of model {model['name']} has "
                        f"{st.st_size} bytes, its manifest says {blob['size']}; pull the model into the store again"
                    )
                blob["src_name"] = name
                blob["src_path"] = path
                blob["src_stat"] = st
        return models

    def open_src_blob(self, blob):
        """fd of a store blob, again without following links, checked to be the file load_models saw."""
        opened = self._store_file(self.src_blobs_fd, blob["src_name"], blob["src_path"])
        if opened is None:
            raise SyncError(f"{blob['src_path']} disappeared from the store while herd worked; run again")
        fd, st = opened
        if (st.st_dev, st.st_ino) != (blob["src_stat"].st_dev, blob["src_stat"].st_ino):
            os.close(fd)
            raise SyncError(f"{blob['src_path']} was replaced in the store while herd worked; run again")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return fd

    # -- dest ---------------------------------------------------------------------------------------------

    def open_dest(self):
        """Open dest's parent (trusted: herd's own root-owned folder) and dest and its folders without links."""
        parent, name = os.path.split(self.dest)
        changed = False
        if not os.path.isdir(parent) and not self.check:
            os.makedirs(parent, 0o755)
            changed = True
        try:
            parent_fd = self._keep(os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            parent_fd = None
        st = _lstat_at(parent_fd, name)
        if st is not None and stat.S_ISLNK(st.st_mode) and self._trusted_link(parent_fd, st):
            # dest itself is a link root made in a folder only root can write (an administrator's choice)
            self.dest_fd = self._keep(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd))
            changed |= self.fix_attrs(self.dest_fd, self.dir_mode)
        else:
            self.dest_fd, c = self.ensure_dir_at(parent_fd, name, self.dest)
            changed |= c
        self.blobs_fd, c = self.ensure_dir_at(self.dest_fd, "blobs", self.blobs_dir)
        changed |= c
        self.manifests_fd, c = self.ensure_dir_at(self.dest_fd, "manifests", self.manifests_dir)
        changed |= c
        return changed

    @staticmethod
    def _trusted_link(parent_fd, link_st):
        """A link owned by root in a folder owned by root that no one else can write: only root could make it."""
        pst = os.fstat(parent_fd)
        return link_st.st_uid == 0 and pst.st_uid == 0 and not pst.st_mode & 0o022

    def open_partial(self):
        """The folder for temporaries: root's own (0700); ownership is set on each file before it is renamed."""
        st = _lstat_at(self.dest_fd, PARTIAL_DIR)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self.replace_link(self.dest_fd, PARTIAL_DIR, self.partial_dir, _kind(st))
            st = None
        if st is None:
            os.mkdir(PARTIAL_DIR, 0o700, dir_fd=self.dest_fd)
        self.partial_fd = self._keep(os.open(PARTIAL_DIR, O_DIR, dir_fd=self.dest_fd))
        if os.geteuid() == 0 and os.fstat(self.partial_fd).st_uid != 0:
            os.fchown(self.partial_fd, 0, 0)  # made by someone else: no one but root may swap temporaries in it
        os.fchmod(self.partial_fd, 0o700)

    def open_dest_file(self, dir_fd, name, path):
        """(fd, stat) of an existing regular file in dest; a link or special file there is removed (reported).

        Returns None when missing or removed.
        """
        st = _lstat_at(dir_fd, name)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise SyncError(f"{path} is a folder, expected a file; remove it by hand")
        if not stat.S_ISREG(st.st_mode):
            self.replace_link(dir_fd, name, path, _kind(st))
            return None
        try:
            return _open_file_at(dir_fd, name)
        except (NotRegular, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
                raise
            raise SyncError(
                f"{path} was replaced while herd worked on it; something with write access to {self.dest} is "
                f"changing it: stop that host's Ollama instance and run again"
            ) from None

    # -- blob writers ------------------------------------------------------------------------------------

    def _fail_digest(self, blob, got, what):
        raise SyncError(
            f"digest mismatch for blob {blob['digest']} ({what} {blob['src_path']}): content hashes to {got}; "
            f"nothing was written under its final name; pull the model into the store {self.src} again"
        )

    def _copy_to(self, blob, fd):
        """Copy the store blob into the open temporary fd, hashing the bytes as they are written."""
        h = hashlib.sha256()
        size, written = blob["size"], 0
        next_log = GIB
        src = self.open_src_blob(blob)
        try:
            while True:
                chunk = os.read(src, CHUNK)
                if not chunk:
                    break
                if self.verify:
                    h.update(chunk)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                written += len(chunk)
                if written >= next_log:
                    self.module.log(
                        f"ollama_model_sync: {blob['digest']} {human_bytes(written)} of {human_bytes(size)}"
                    )
                    next_log += GIB
        finally:
            os.close(src)
        os.fsync(fd)
        if written != size:
            raise SyncError(f"blob {blob['src_path']} changed while being copied ({written} bytes, expected {size})")
        if self.verify:
            got = "sha256:" + h.hexdigest()
            if got != blob["digest"]:
                self._fail_digest(blob, got, "copied from")
        return written

    def _reflink_to(self, blob, fd):
        src = self.open_src_blob(blob)
        try:
            fcntl.ioctl(fd, FICLONE, src)
        except OSError as exc:
            if exc.errno in REFLINK_ERRNOS:
                raise SyncError(self._reflink_message(exc)) from None
            raise
        finally:
            os.close(src)
        os.fsync(fd)
        if self.verify:
            got = _sha256_fd(fd)
            if got != blob["digest"]:
                self._fail_digest(blob, got, "reflinked from")

    def _reflink_message(self, exc):
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                text = f.read()
        except OSError:
            text = ""
        src_fs, src_mnt = mount_fstype(self.src, text)
        dst_fs, dst_mnt = mount_fstype(os.path.realpath(self.dest), text)
        where = (
            f"{dst_fs} filesystem at {dst_mnt}"
            if (src_fs, src_mnt) == (dst_fs, dst_mnt)
            else f"store on {src_fs} at {src_mnt}, instance on {dst_fs} at {dst_mnt}"
        )
        return (
            f"method=reflink failed ({os.strerror(exc.errno)}): the {where} cannot reflink from {self.src} "
            f"to {self.dest}; use method=copy or method=hardlink, or keep both on one XFS (reflink=1) or "
            f"Btrfs filesystem"
        )

    def _hardlink_to(self, blob, tmp):
        """Hard link the store's file (the inode load_models checked, never a link) as tmp in the partial folder."""
        src = self.open_src_blob(blob)
        try:
            if self.verify:
                got = _sha256_fd(src)
                if got != blob["digest"]:
                    self._fail_digest(blob, got, "store file")
        finally:
            os.close(src)
        try:
            os.link(
                blob["src_name"], tmp, src_dir_fd=self.src_blobs_fd, dst_dir_fd=self.partial_fd, follow_symlinks=False
            )
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise SyncError(
                    f"method=hardlink needs the store {self.src} and {self.dest} on one filesystem; "
                    f"use method=copy or method=reflink"
                ) from None
            raise
        fd = os.open(tmp, O_READ, dir_fd=self.partial_fd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (blob["src_stat"].st_dev, blob["src_stat"].st_ino):
            os.close(fd)
            raise SyncError(f"{blob['src_path']} was replaced in the store while herd worked; run again")
        return fd

    def write_blob(self, blob, reason):
        name = blob_filename(blob["digest"])
        final = os.path.join(self.blobs_dir, name)
        entry = {"digest": blob["digest"], "size": blob["size"], "action": self.method, "reason": reason}
        self.result["blobs"].append(entry)
        if self.method == "copy":
            self.result["copied"].append(blob["digest"])
        else:
            self.result["linked"].append(blob["digest"])
        if reason != "missing":
            self.result["repaired"].append({"digest": blob["digest"], "reason": reason})
        if self.check:
            if self.method == "copy":
                self.result["bytes_copied"] += blob["size"]
            return
        tmp = self._tmp_name(name)
        self.module.log(f"ollama_model_sync: {self.method} {blob['digest']} ({human_bytes(blob['size'])}) -> {final}")
        start = time.monotonic()
        fd = None
        try:
            if self.method == "hardlink":
                fd = self._hardlink_to(blob, tmp)
            else:
                fd = os.open(tmp, O_CREATE, 0o600, dir_fd=self.partial_fd)
                if self.method == "copy":
                    self.result["bytes_copied"] += self._copy_to(blob, fd)
                else:
                    self._reflink_to(blob, fd)
            self._apply_attrs(fd, self.mode)
            # rename replaces the name in blobs/ (a link there is replaced, never followed)
            os.rename(tmp, name, src_dir_fd=self.partial_fd, dst_dir_fd=self.blobs_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.partial_fd)
            except OSError:
                pass
            raise
        finally:
            if fd is not None:
                os.close(fd)
        os.fsync(self.blobs_fd)
        seconds = time.monotonic() - start
        entry["seconds"] = round(seconds, 3)
        entry["mib_per_s"] = round(blob["size"] / 1048576.0 / seconds, 1) if seconds > 0 else None
        self.module.log(f"ollama_model_sync: done {blob['digest']} in {seconds:.1f} s")

    def write_manifest(self, model):
        parts = model["parts"]
        final = os.path.join(self.dest, model["manifest"])
        dir_fd = self.manifests_fd
        for i, part in enumerate(parts[:-1]):
            dir_fd, changed = self.ensure_dir_at(dir_fd, part, os.path.join(self.manifests_dir, *parts[: i + 1]))
            if changed:
                self.result["changed"] = True
        opened = self.open_dest_file(dir_fd, parts[-1], final)
        current = None
        if opened is not None:
            fd, st = opened
            try:
                # a manifest with other hard links is rewritten: fchown on it would change the other names too
                current = _read_fd(fd) if st.st_nlink == 1 else None
                if current == model["bytes"]:
                    if self.fix_attrs(fd, self.mode):
                        self.result["changed"] = True
                    return
            finally:
                os.close(fd)
        self.result["manifests_written"].append(model["manifest"])
        self.result["changed"] = True
        if self.check:
            return
        tmp = self._tmp_name("manifest")
        try:
            fd = os.open(tmp, O_CREATE, 0o600, dir_fd=self.partial_fd)
            try:
                os.write(fd, model["bytes"])
                os.fsync(fd)
                self._apply_attrs(fd, self.mode)
            finally:
                os.close(fd)
            os.rename(tmp, parts[-1], src_dir_fd=self.partial_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.partial_fd)
            except OSError:
                pass
            raise
        os.fsync(dir_fd)

    # -- prune -------------------------------------------------------------------------------------------

    def _walk(self, dir_fd, parts):
        """(parts, lstat) of every non-folder entry below the open folder dir_fd; links are listed, never entered."""
        found = []
        for name in sorted(os.listdir(dir_fd)):
            st = _lstat_at(dir_fd, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                sub = _open_dir_at(dir_fd, name)
                if sub is None:
                    continue
                try:
                    found.extend(self._walk(sub, parts + [name]))
                finally:
                    os.close(sub)
            else:
                found.append((parts + [name], st))
        return found

    def dest_manifests(self):
        """(relative path, full name or None) of every file (or link) below dest/manifests, none followed."""
        if self.manifests_fd is None:
            return []
        return [
            (os.path.join("manifests", *parts), name_from_parts(parts))
            for parts, _st in self._walk(self.manifests_fd, [])
        ]

    def dest_blobs(self):
        """{name: lstat} of the entries named sha256-<hex> in dest/blobs (links included, never followed)."""
        if self.blobs_fd is None:
            return {}
        out = {}
        for name in os.listdir(self.blobs_fd):
            if BLOB_FILE_RE.match(name):
                st = _lstat_at(self.blobs_fd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    out[name] = st
        return dict(sorted(out.items()))

    def _unlink_manifest(self, rel):
        parts = rel.split(os.sep)[1:]
        dir_fd, opened = self.manifests_fd, []
        try:
            for part in parts[:-1]:
                dir_fd = _open_dir_at(dir_fd, part)
                if dir_fd is None:
                    return
                opened.append(dir_fd)
            os.unlink(parts[-1], dir_fd=dir_fd)
        finally:
            for fd in opened:
                os.close(fd)

    def _remove_empty_dirs(self, dir_fd):
        """Remove folders left empty below dir_fd, deepest first (never through a link). True when dir_fd is empty."""
        for name in os.listdir(dir_fd):
            st = _lstat_at(dir_fd, name)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue
            sub = _open_dir_at(dir_fd, name)
            if sub is None:
                continue
            try:
                empty = self._remove_empty_dirs(sub)
            finally:
                os.close(sub)
            if empty:
                os.rmdir(name, dir_fd=dir_fd)
        return not os.listdir(dir_fd)

    def prune_dest(self, models):
        wanted_manifests = {m["manifest"] for m in models}
        wanted_blobs = {blob_filename(b["digest"]) for m in models for b in m["blobs"]}
        for rel, fullname in self.dest_manifests():
            if rel in wanted_manifests or fullname is None:
                continue
            self.result["pruned_models"].append(fullname)
            if not self.check:
                self._unlink_manifest(rel)
        if self.result["pruned_models"] and not self.check:
            self._remove_empty_dirs(self.manifests_fd)
        for name in self.dest_blobs():
            if name in wanted_blobs:
                continue
            self.result["pruned_blobs"].append(digest_from_filename(name))
            if not self.check:
                os.unlink(name, dir_fd=self.blobs_fd)

    # -- the run -----------------------------------------------------------------------------------------

    def snapshot(self):
        if self.dest_fd is None:
            return ""
        lines = [rel for rel, _name in self.dest_manifests()]
        for name, st in self.dest_blobs().items():
            lines.append(f"blobs/{name} {st.st_size}")
        return "".join(line + "\n" for line in lines)

    def run(self, names):
        models = self.load_models(names)
        changed_dirs = self.open_dest()
        before = self.snapshot() if self.module._diff else None
        if not self.check:
            self.open_partial()
            self.lock()
        elif _kind(_lstat_at(self.dest_fd, PARTIAL_DIR)) == "folder":
            self.partial_fd = self._keep(_open_dir_at(self.dest_fd, PARTIAL_DIR))
        self.remove_stale()

        # plan every blob first, so a lack of space shows before anything is written
        todo, seen, need_bytes = [], set(), 0
        for model in models:
            for blob in model["blobs"]:
                if blob["digest"] in seen:
                    continue
                seen.add(blob["digest"])
                name = blob_filename(blob["digest"])
                opened = self.open_dest_file(self.blobs_fd, name, os.path.join(self.blobs_dir, name))
                fd, dest_st = opened if opened is not None else (None, None)
                try:
                    action, reason = decide_blob(blob, dest_st, blob["src_stat"], self.method)
                    if action is None and self.verify_existing:
                        got = _sha256_fd(fd)
                        if got != blob["digest"]:
                            action, reason = self.method, f"content hashes to {got}"
                    if action is None:
                        if self.fix_attrs(fd, self.mode):
                            self.result["changed"] = True
                        continue
                finally:
                    if fd is not None:
                        os.close(fd)
                todo.append((blob, reason))
                if self.method == "copy":
                    need_bytes += blob["size"]
        if need_bytes and self.dest_fd is not None:
            vfs = os.statvfs(self.dest_fd)
            free = vfs.f_bavail * vfs.f_frsize
            if need_bytes > free:
                raise SyncError(
                    f"not enough space in {self.dest}: the copies need {human_bytes(need_bytes)}, "
                    f"{human_bytes(free)} is free; free space, or use method=hardlink or method=reflink"
                )

        for blob, reason in todo:
            self.write_blob(blob, reason)
            self.result["changed"] = True
        for model in models:
            self.write_manifest(model)
        if self.prune:
            self.prune_dest(models)
        if self.result["stale_removed"] or self.result["pruned_models"] or self.result["pruned_blobs"] or changed_dirs:
            self.result["changed"] = True

        for model in models:
            self.result["models"].append(
                {
                    "name": model["name"],
                    "fullname": model["fullname"],
                    "manifest": model["manifest"],
                    "id": "sha256:" + hashlib.sha256(model["bytes"]).hexdigest(),
                    "digests": [b["digest"] for b in model["blobs"]],
                    "size": sum(b["size"] for b in model["blobs"]),
                }
            )
        if before is not None:
            after = self.planned_snapshot(models) if self.check else self.snapshot()
            self.result["diff"] = {
                "before": before,
                "after": after,
                "before_header": self.dest,
                "after_header": self.dest,
            }
        r = self.result
        r["msg"] = (
            f"{len(models)} model(s): copied {len(r['copied'])} blob(s) ({human_bytes(r['bytes_copied'])}), "
            f"linked {len(r['linked'])}, repaired {len(r['repaired'])}, "
            f"pruned {len(r['pruned_models'])} model(s) and {len(r['pruned_blobs'])} blob(s)"
        )
        if r["links_replaced"]:
            r["msg"] += (
                f"; replaced {len(r['links_replaced'])} link(s) (never followed): {', '.join(r['links_replaced'])}"
            )
        if self.check:
            r["msg"] = "check mode, nothing written: " + r["msg"]
        return r

    def planned_snapshot(self, models):
        """What snapshot() would show after a real run (used for the diff in check mode)."""
        manifests = {rel for rel, _name in self.dest_manifests()}
        blobs = {name: st.st_size for name, st in self.dest_blobs().items()}
        for model in models:
            manifests.add(model["manifest"])
            for b in model["blobs"]:
                blobs[blob_filename(b["digest"])] = b["size"]
        if self.prune:
            manifests -= {m for m, n in self.dest_manifests() if n in self.result["pruned_models"]}
            for d in self.result["pruned_blobs"]:
                blobs.pop(blob_filename(d), None)
        lines = sorted(manifests) + [f"blobs/{n} {s}" for n, s in sorted(blobs.items())]
        return "".join(line + "\n" for line in lines)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            models=dict(type="list", elements="str", required=True),
            method=dict(type="str", default="copy", choices=["copy", "hardlink", "reflink"]),
            prune=dict(type="bool", default=False),
            verify=dict(type="bool", default=True),
            verify_existing=dict(type="bool", default=False),
            owner=dict(type="str"),
            group=dict(type="str"),
            mode=dict(type="str", default="0644"),
            dir_mode=dict(type="str", default="0755"),
        ),
        supports_check_mode=True,
    )
    syncer = None
    try:
        syncer = Syncer(module, module.params)
        try:
            result = syncer.run(module.params["models"])
        finally:
            syncer.close()
    except (SyncError, OSError) as exc:
        if isinstance(exc, SyncError):
            msg = str(exc)
        else:
            msg = f"{exc.strerror or exc}: {exc.filename or ''}".strip()
            if exc.errno == errno.ENOSPC:
                msg += (
                    "; the disk is full: free space and run again (the next run removes the partial copy and redoes it)"
                )
        partial = syncer.result if syncer else {}
        module.fail_json(
            msg=msg,
            **{k: v for k, v in partial.items() if k not in ("changed", "msg", "diff")},
            changed=bool(partial.get("changed") and not module.check_mode),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
