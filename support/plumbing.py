"""Shared plumbing: atomic writes, seeds, digests, CPU threads, DDP helpers, pickle-free run state.

Skip this file on a first read: nothing here is FashionLens. It holds the machinery every entry point
needs once, so that the concept files (data.py, model.py, train.py, evaluate.py) show only their
concept. One helper per job, for the whole project:

    atomic_write(path, content)   the only way a file or folder is published (text, bytes, or a builder);
                                  never over a device or FIFO; a full disk is one WriteError naming the path
    append_jsonl / trim_jsonl     the training log: whole lines only (a full disk or a killed write
                                  leaves no torn line behind for --resume)
    mix_seed(*parts)              the only hash from values to a seed / stable id
    params_digest(module)         the only fingerprint of a model's trainable weights
    file_sha256, json_sha256      the only hash of a file's bytes / of a JSON value (saved digests)
    set_cpu_threads(...)          the only place torch's CPU thread count is chosen
    check_device, check_writable  the flag checks every entry point makes before it builds anything
    DistInfo, init_distributed, gather_with_grad, ...   torchrun / DDP, no-ops in one process
    write_state / read_state      nested training state -> JSON + safetensors (never pickle), digests checked

Importing this module sets OMP_WAIT_POLICY=PASSIVE before torch loads (see the comment below), so
entry points import it before torch.

Shape legend: b rows on this rank, W world size (processes), D feature width.
"""
from __future__ import annotations

import os

# OpenMP threads that busy-wait between ops collapse when the cores are shared (another job, a test
# run, a second torchrun rank): a training step took 20 s instead of 1.3 s on 2 busy cores.
# Sleeping waiters cost nothing measurable when the machine is ours. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Union  # noqa: E402

import torch  # noqa: E402  (after the OpenMP setting above)
import torch.distributed as dist  # noqa: E402

from support.errors import FlagError, TrainingError, WriteError  # noqa: E402

# ================================================================================================
# Atomic writes
# ================================================================================================


def atomic_write(path: Union[str, os.PathLike], content: Union[str, bytes, Callable[[Path], object]]) -> Path:
    """Publish `path` (a file or a folder) all at once: readers see the old version or the new one.

    content: str (UTF-8 text) or bytes for a file; or a callable that builds the file or folder at
    the temporary path it is given (e.g. a checkpoint's save function). The new version is built at
    `.NAME.tmp` beside `path`, then swapped in:

        path -> .NAME.old      (only if path exists; a folder cannot be os.replace'd over a full one)
        .NAME.tmp -> path
        remove .NAME.old

    At every moment either `path` or `.NAME.old` is complete, which is why a resume looks at both.
    A failure while building removes the temporary and leaves the old version untouched; a full disk
    is a WriteError naming `path`. Only regular files and folders are published: a device, FIFO or
    socket at `path` (e.g. --out /dev/full) is refused, never replaced by a regular file.
    """
    path = Path(path)
    kind = special_kind(path)
    if kind:
        raise WriteError(f"{path}: is {kind}, not a regular file or folder; nothing was written "
                         f"(give the path of a file to write)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    _remove(tmp)  # the remains of an interrupted earlier write
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, (bytes, bytearray)):
            tmp.write_bytes(content)
        else:
            content(tmp)
        if path.is_dir():  # a folder: move the old one aside first
            _remove(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)  # atomic on one file system
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the old version back
            raise
    except Exception as err:
        if _disk_full(err):
            raise _not_written(path, err, "the copy already there is intact" if path.exists()
                               else "no earlier copy existed") from None
        raise
    finally:
        _remove(tmp)  # (a full disk also gets its space back)
    _remove(old)
    return path


def special_kind(path: Union[str, os.PathLike]) -> Optional[str]:
    """What `path` is when it exists but is neither a regular file nor a folder (following a symlink):
    "a character device", "a FIFO", ...; None otherwise. Writing there would either replace the node
    with a plain file (atomic_write's rename) or block on a FIFO, so outputs refuse it."""
    try:
        mode = os.stat(path).st_mode  # follows a symlink: a link to /dev/full is a device
    except (OSError, ValueError):  # absent, a dangling link, a name too long: nothing special there
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe (FIFO)",
            stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "a special file")


def _disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT: as an OSError, or only in the text of a library's own error (safetensors
    raises SafetensorError "... No space left on device (os error 28)", not an OSError)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(os.strerror(e) in str(err) or f"os error {e}" in str(err) for e in (errno.ENOSPC, errno.EDQUOT))


def _not_written(path: Path, err: BaseException, intact: str) -> WriteError:
    """The WriteError of a full disk: the file, the reason, what is intact (errno kept for callers)."""
    code = err.errno if isinstance(err, OSError) else (
        errno.EDQUOT if os.strerror(errno.EDQUOT) in str(err) else errno.ENOSPC)
    out = WriteError(f"{path}: not written, {os.strerror(code).lower()}; {intact}")
    out.errno = code
    return out


def _remove(p: Path) -> None:
    """Delete a file or a folder if it exists."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def append_jsonl(path: Union[str, os.PathLike], record: dict) -> None:
    """Append one JSON object as a line (the training log), never leaving a torn line of ours.

    The line goes out in one write; if that fails (a full disk can take half of it, then refuse the
    rest), the file is cut back to its previous length before the error (a WriteError when the disk
    is full) is raised, so a `--resume` after freeing space reads whole lines only. A kill in the
    middle of the write can still cut the last line: trim_jsonl drops that one.
    """
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(line):  # a short write only happens when the disk fills up mid-line
                done += os.write(fd, line[done:])
        except OSError as err:
            os.ftruncate(fd, size)
            if _disk_full(err):
                raise _not_written(Path(path), err, "the file is as it was before this line") from None
            raise
    finally:
        os.close(fd)


def trim_jsonl(path: Union[str, os.PathLike], upto_step: int) -> None:
    """Keep only the lines with step <= upto_step (on resume: the later ones will be written again).

    A kill in the middle of an append can leave a last line cut short (torn JSON, or half of a UTF-8
    character): it is dropped with one `warning:` line. A bad line before the last one is no crash
    artefact (the file was edited or damaged): a TrainingError naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    lines = lines[:-1] if lines[-1] == b"" else lines  # the newline that ends the last line
    keep = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not (isinstance(rec, dict) and isinstance(rec.get("step", 0), int)):
                raise ValueError("not a log record (a JSON object with an integer step)")
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSONDecodeError too
            why = f"{type(err).__name__}: {str(err)[:200]}"
            if i < len(lines):
                raise TrainingError(f"{path}: line {i} of {len(lines)} is unreadable ({why}); only the last line can "
                                    f"be cut by a crash, so this file was edited or damaged: repair or delete that "
                                    f"line, then --resume again") from None
            print(f"warning: {path}: dropped its last line {i}, cut short by an interrupted write ({why})",
                  file=sys.stderr, flush=True)
            continue
        if rec.get("step", 0) <= upto_step:
            keep.append(raw.decode("utf-8") + "\n")
    atomic_write(path, "".join(keep))


# ================================================================================================
# Seeds and digests
# ================================================================================================


def mix_seed(*parts) -> int:
    """A non-negative 63-bit integer from any values, stable across processes and Python runs.

    Used for every derived seed (run seed, step, rank -> dropout; run seed, step, record -> data
    draws) and as a stable id (a target path -> an int that is equal on every DDP rank). Python's
    hash() is salted per process, so it cannot serve here.
    """
    h = hashlib.blake2b("fashionlens/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # >> 1: torch.manual_seed takes at most 2**63 - 1


def machine_info(repo: Union[str, os.PathLike, None] = None) -> dict:
    """Where a result was computed: CPU model, cores, torch and python versions, the date and, when `repo`
    is a git checkout, its commit (with "+dirty" when tracked files differ). Written into every run's
    config.json and printed above every benchmark, so a number can be traced to the machine behind it
    (the same seed rounds differently on another CPU)."""
    import datetime
    import platform
    import subprocess

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu_model": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "commit": None}
    if repo is not None:
        try:
            git = ["git", "-C", str(repo)]
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            if head.returncode == 0:
                info["commit"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass  # no git here: the commit stays unknown
    return info


def params_digest(module: torch.nn.Module, prefix: str = "") -> str:
    """sha256 over `prefix` and the names and bytes of the trainable parameters, in module order.

    Equal digests = identical trainable weights: DDP checks its ranks agree with it, and the gallery
    cache keys its embeddings with it (prefix = the embedder's config; a frozen pretrained base is
    identified by its name in the config, so 4 B frozen weights are not hashed).
    """
    h = hashlib.sha256(prefix.encode())
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ================================================================================================
# CPU threads
# ================================================================================================


def set_cpu_threads(requested: int, device: str, small_model: bool) -> int:
    """Choose torch's CPU thread count; return the count now in use.

    requested > 0 is used as given. 0 = auto: a small model on CPU gets 1 thread, because its
    128-wide matrices are too small to split and the hand-offs between threads cost more than they
    gain; an explicit OMP_NUM_THREADS, a GPU, or a real backbone keeps torch's own choice.
    """
    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS") and device == "cpu" and small_model:
        torch.set_num_threads(1)
    return torch.get_num_threads()


# ================================================================================================
# Checks of flags every entry point shares (before anything is built or written)
# ================================================================================================


def check_device(flag: str, device: str) -> None:
    """auto | cpu | cuda | cuda:N, and a CUDA device only where this torch build sees one.

    Without this a CPU-only torch fails deep inside the model build with an AssertionError.
    `flag` is what the message names: "--device", or a checkpoint's config field.
    """
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu"):
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise FlagError(f"{flag} {device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FlagError(f"{flag} {device}: CUDA is not available (torch {torch.__version__} sees no "
                        f"GPU); use --device cpu, or auto to take a GPU only when there is one")
    if index and int(index) >= torch.cuda.device_count():
        raise FlagError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def check_writable(flag: str, path: Union[str, os.PathLike], folder: bool = True) -> None:
    """`path` is, or can be created as, a writable folder (or, folder=False, a file we may write).

    Looks at the nearest part of the path that exists, where mkdir would start creating: it must be
    a directory we can write into. A regular file in the way, or a read-only folder or mount, would
    otherwise fail with an OSError after minutes of work. Writing a probe file is the only sure test
    (permission bits say nothing to root, nor about a read-only mount).
    folder=False: an existing `path` must be a regular file (or a link to one): atomic_write would
    replace a device, a FIFO or a socket by a plain file, so /dev/full or a named pipe is refused
    here. Every name still to be created must fit the file system's name length (NAME_MAX, usually
    255 bytes), the last one with room for atomic_write's `.NAME.tmp` beside it.
    """
    target = Path(path).absolute()  # os.path's tests, not Path's: they answer False to a name too long
    if not folder and os.path.isdir(target):
        raise FlagError(f"{flag} {path}: is a directory, not a file")
    kind = None if folder else special_kind(target)
    if kind:
        raise FlagError(f"{flag} {path}: is {kind}, not a regular file; results are written to regular files only")
    probe = target if folder else target.parent
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FlagError(f"{flag} {path}: {probe} is not a directory")
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):  # the system cannot say: the usual limit
        name_max = 255
    new = target.relative_to(probe).parts if target != probe else ()  # the names mkdir/open will create
    for i, name in enumerate(new):
        room = len(".tmp") + 1 if i == len(new) - 1 else 0  # atomic_write's temporary is .NAME.tmp
        if len(os.fsencode(name)) + room > name_max:
            raise FlagError(f"{flag} {path}: the name {name[:40]!r}... is {len(os.fsencode(name))} bytes long; "
                            f"this file system allows {name_max - room} here")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise FlagError(f"{flag} {path}: {probe} is not writable ({e.strerror or e})") from None


# ================================================================================================
# Distributed data parallel (torchrun); every helper is a no-op in a single process
# ================================================================================================


@dataclass
class DistInfo:
    """Where this process sits: rank r of W processes, and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files and prints; the others only compute."""
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{local}"  # one GPU per process
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def barrier(di: DistInfo) -> None:
    """Wait until every rank gets here (e.g. rank 0 has written a file the others read)."""
    if di.enabled:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of ITS slice, summed over ranks.

    Every rank computes the same global loss L from the gathered (W*b, D) tensor, so rank s's slice
    receives dL/dx_s from every rank: the sum is W * dL/dx_s, and DDP's gradient averaging (/W)
    brings it back to exactly dL/dtheta. all_reduce + slicing works on every backend (gloo has no
    reduce_scatter), and at (W*b, D) floats it costs nothing next to the model.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]  # W x (b, D)
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)  # (W*b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # (W*b, D): all_reduce works in place
        dist.all_reduce(grad)  # sum over ranks of dL/d(gathered)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]  # (b, D) this rank's slice


def gather_with_grad(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """(b, ...) per rank -> (W*b, ...) in rank order, differentiable. Identity in one process."""
    return _GatherWithGrad.apply(x) if di.enabled else x


def gather_nograd(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """(b, ...) per rank -> (W*b, ...) in rank order, without autograd."""
    if not di.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(di.world)]  # W x (b, ...)
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)  # (W*b, ...)


def mean_over_ranks(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """The mean of a detached scalar over ranks (for logging a per-rank quantity)."""
    if not di.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / di.world


def rank_digests(module: torch.nn.Module, di: DistInfo) -> list[str]:
    """Every rank's params_digest, in rank order (DDP must keep them equal)."""
    mine = params_digest(module)
    if not di.enabled:
        return [mine]
    t = torch.tensor(list(bytes.fromhex(mine)), dtype=torch.uint8, device=di.device)  # (32,) sha256 bytes
    parts = [torch.empty_like(t) for _ in range(di.world)]  # W x (32,)
    dist.all_gather(parts, t)
    return [bytes(p.tolist()).hex() for p in parts]


def _unwrap(model):
    """The FashionLensEmbedder inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _sync_ctx(model, last: bool):
    """DDP: skip the gradient all-reduce on every backward but the last one of the step."""
    import contextlib

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def check_ranks_agree(module, di: DistInfo) -> None:
    """DDP must keep every rank's weights identical; verify it at the end of a run (cheap)."""
    from support.errors import TrainingError

    digests = rank_digests(module, di)
    if di.main:  # one process prints every rank's digest: lines from several processes can interleave
        for r, d in enumerate(digests):
            print(f"[rank {r}] trainable parameters sha256 {d}", flush=True)
    if len(set(digests)) > 1:
        raise TrainingError("DDP ranks ended with different parameters (digests differ): "
                            + ", ".join(d[:12] for d in digests))


# ================================================================================================
# Run state without pickle: tensors -> safetensors, everything else -> JSON
# ================================================================================================

STATE_JSON, STATE_TENSORS = "train_state.json", "train_state.safetensors"


def rng_snapshot() -> dict:
    """Every global random number generator a training step could touch."""
    import numpy as np

    snap = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_restore(snap: dict) -> None:
    """Put back what rng_snapshot() took."""
    import numpy as np

    random.setstate(snap["python"])
    torch.set_rng_state(snap["torch"])
    np.random.set_state(snap["numpy"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


def _to_json(obj, tensors: dict, path: str):
    """A nested state (dicts with any keys, tuples, tensors, numpy arrays) -> JSON + named tensors."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if type(obj).__module__ == "numpy":  # numpy scalars and arrays (numpy's RNG state)
        import numpy as np

        arr = np.asarray(obj)
        return {"__ndarray__": arr.tolist(), "dtype": str(arr.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # e.g. the optimizer's {param index: state}: keep the key types exactly
        return {"__items__": [[_to_json(k, tensors, f"{path}.k{i}"), _to_json(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in the training state")


def _from_json(obj, tensors: dict):
    """The inverse of _to_json."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__items__" in obj:
            return {_from_json(k, tensors): _from_json(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj


def file_sha256(file: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights can be large): the one file hash
    of the project (checkpoint weight files, the training state, the training data's triplet files)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_sha256(obj) -> str:
    """Hex sha256 of a JSON value in canonical form (sorted keys, no spaces): equal for equal values
    however the file that held them was laid out. JSON keeps every float exactly (repr), so a value
    read back from a file hashes as the value that was written."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# train_state.json's key for the digests of both state files. A state written before digests has none:
# it still loads, with one warning (a run of an older version must stay resumable).
STATE_DIGESTS = "__digests__"
_warned: set = set()  # files already warned about: a resume reads its state twice (config, then state)


def warn_once(file: Union[str, os.PathLike], why: str) -> None:
    """One `warning: FILE: why` line on stderr, once per file and process."""
    import sys

    if str(file) not in _warned:
        _warned.add(str(file))
        print(f"warning: {file}: {why}", file=sys.stderr, flush=True)


def write_state(folder: Path, state: dict) -> None:
    """state -> folder/train_state.json + folder/train_state.safetensors (folder must exist).

    train_state.json also records the sha256 of the tensors file and of its own document (canonical
    JSON), which read_state checks: a flipped byte in the optimizer's moments, or an edited GGAS
    difficulty, still parses and would resume silently off the uninterrupted trajectory.
    """
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = _to_json(state, tensors, "s")
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    doc[STATE_DIGESTS] = {STATE_TENSORS: file_sha256(Path(folder) / STATE_TENSORS), STATE_JSON: json_sha256(doc)}
    (Path(folder) / STATE_JSON).write_text(json.dumps(doc))


def read_state(folder: Path, tensors: bool = True) -> dict:
    """The state write_state() stored in folder, both files checked against the digests saved with it.

    A missing file is FileNotFoundError, bad JSON a ValueError, and a file whose sha256 differs from
    the saved one (damaged or edited) a CheckpointError naming it. A state written before digests
    loads with one warning. tensors=False: only train_state.json's document, checked the same way
    (e.g. the step, or the recorded config), without loading the tensors.
    """
    from safetensors.torch import load_file

    from support.errors import CheckpointError

    folder = Path(folder)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: {folder} is not a resumable checkpoint "
                                    f"(runs/NAME/last holds the training state; best/ holds weights only)")
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested absurdly deep
        raise ValueError(f"{folder / STATE_JSON} is not valid JSON: {err}") from None
    saved = doc.pop(STATE_DIGESTS, None) if isinstance(doc, dict) else None
    if not isinstance(saved, dict):
        warn_once(folder / STATE_JSON, f"written before training-state digests (no {STATE_DIGESTS} in it); "
                                       f"{STATE_JSON} and {STATE_TENSORS} are not verified")
    else:
        for name, now in ((STATE_JSON, json_sha256(doc)), (STATE_TENSORS, file_sha256(folder / STATE_TENSORS))):
            if now != saved.get(name):
                raise CheckpointError(f"{folder / name}: damaged or edited: its sha256 differs from the one saved "
                                      f"in {STATE_JSON} ({now[:12]} vs {str(saved.get(name))[:12]}); resume "
                                      f"from an intact copy of the run")
    return _from_json(doc, load_file(str(folder / STATE_TENSORS))) if tensors else doc
