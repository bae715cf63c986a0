"""Checkpoint I/O that never runs code from a file.

Our own models are saved as safetensors: the state dict plus the model's config (JSON,
in the file's metadata), so a file alone rebuilds its model. Formats that need torch's
pickle (.pt, .pth, e.g. Meta's SAM weights) are read with torch.load(weights_only=True),
which refuses anything but tensors and plain containers. The one full-pickle format we
accept (Ultralytics .pt) goes through `engine.models.detector.load_detector_checkpoint`,
and only after its sha256 matches a trusted record.

Every save returns the file's sha256 and writes it beside the file as `<file>.sha256`
(sha256sum format); loads check it against the digest given or, failing that, the one
beside the file.

A file that is no checkpoint at all (an HTML login page saved as .pth, a git-lfs pointer,
an empty or cut-off download) is a CheckpointError saying so (`load_weights_only`);
UnsafeCheckpointError is kept for a well-formed pickle that would import something a
weights-only file never needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from engine.models.errors import CheckpointError, ChecksumMismatchError, UnsafeCheckpointError

FORMAT = "grainflow/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# The first bytes of what torch.load reads: a zip archive (torch.save since torch 1.6) or
# the legacy format, a pickle stream that opens with the PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
# The legacy format is five pickles (magic number, protocol, system info, the object,
# storage keys) followed by raw storage bytes: at most these many are scanned.
_LEGACY_PICKLES = 5
# Globals a torch.save'd state dict imports; any other in a refused pickle is named.
_TORCH_GLOBALS = ("torch.", "collections.OrderedDict")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return sha256_of(f)


def sha256_of(f: BinaryIO) -> str:
    """Hex sha256 of an open file's bytes (local or fsspec) from where it stands to its end."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def check_hex(path: Path, expected) -> None:
    """CheckpointError naming `path` unless `expected` is a sha256 (64 hex digits)."""
    if not isinstance(expected, str) or not _HEX64.match(expected.lower()):
        raise CheckpointError(f"{path}: expected_sha256 must be 64 hex digits, got {expected!r}")


def sidecar_path(path: str | Path) -> Path:
    """Where a checkpoint's recorded digest lives: `<file>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: str | Path) -> str | None:
    """The digest recorded beside `path`, or None when there is no sidecar file."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    return parse_sidecar(side.read_text(), str(side))


def parse_sidecar(text: str, where: str) -> str:
    """The digest of a sha256 record (`<64 hex digits>  <name>`, as sha256sum writes it);
    CheckpointError naming `where` when it is not one."""
    words = text.split()
    if not words or not _HEX64.match(words[0].lower()):
        raise CheckpointError(f"{where}: not a sha256 record (expected 64 hex digits)")
    return words[0].lower()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against the digest recorded for it; returns the digest.

    Raises ChecksumMismatchError (naming the file and both digests) when they differ.
    """
    check_hex(Path(path), expected)
    with open_checked(path, expected):
        return expected.lower()


def open_checked(path: str | Path, expected_sha256: str | None = None) -> BinaryIO:
    """The file opened once for reading, its sha256 checked on this open file against
    `expected_sha256` or, when not given, the `<file>.sha256` beside it (neither: not
    checked). Parse what this returns, not the path again: a file replaced after the
    check (a shared cache, another process) is then never the one loaded."""
    return _open_checked(path, expected_sha256)[0]


def _open_checked(path: str | Path, expected_sha256: str | None) -> tuple[BinaryIO, os.stat_result]:
    """`open_checked`, and the file's stat taken before its bytes were hashed."""
    path = Path(path)
    expected = expected_sha256 if expected_sha256 is not None else read_sidecar(path)
    if expected is not None:
        check_hex(path, expected)
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    before = os.fstat(f.fileno())
    if expected is not None:
        actual = sha256_of(f)
        if actual != expected.lower():
            f.close()
            raise ChecksumMismatchError(str(path), expected.lower(), actual)
        f.seek(0)
    return f, before


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (8-byte little-endian length, JSON)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None


def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place.
    safetensors writes the metadata in a hash map's order, which changes from one save to
    the next, so the same weights saved twice got two sha256s; sorted, the digest depends
    on the tensors and metadata only. The sorted header has the same characters in
    another order, so the same length (a shorter one is padded with spaces, as the format
    allows), and the tensors' offsets, relative to the data after the header, stay valid."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > n:  # an escape written otherwise than serde_json does: keep its order
            return
        f.seek(8)
        f.write(canonical.ljust(n, b" "))


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> str:
    """Save a model built by engine.models as safetensors; returns the file's sha256.

    The file holds the state dict and, in its metadata, "format" and "config" (the
    model's config as JSON), plus any extra string `metadata`. The digest is also
    written to `<path>.sha256`. The file appears complete or not at all (written to a
    temporary name, then renamed). The same weights and metadata make the same file, so
    the same sha256, whatever the tensors' memory layout.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(f"{path}: model {type(model).__name__} has no .config; build it with engine.models.create_model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(metadata or {}), "format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_plain_tensors(model.state_dict()), str(tmp), metadata=meta)
        _sort_header(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    digest = sha256_file(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (no tensors are read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None


def read_config(path: str | Path):
    """The ModelConfig recorded in a checkpoint saved by `save_checkpoint`."""
    return _config_of(read_metadata(path), path)


def _config_of(meta: dict[str, str], path) -> Any:
    """The ModelConfig in a checkpoint's metadata (CheckpointError if it is not ours)."""
    from engine.models.families import ModelConfig

    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a grainflow checkpoint (metadata format={meta.get('format')!r})")
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its recorded model config is damaged ({type(exc).__name__}: {exc}); "
                              "the file was not written by save_checkpoint or was changed since") from None


def unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (e.g.
    "Unsupported global: GLOBAL io.open ...", "Unsupported operand 60"), without its
    advice to load unsafely."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            # torch puts the reason after the marker, or on the next non-empty line
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or next((x for x in lines[i + 1:] if x), "")
            return reason.split(". Please use")[0]
    for line in lines:
        if line.lower().startswith(("trying to load unsupported", "unsupported")):
            return line
    return type(exc).__name__


def load_state_dict(
    path: str | Path, *, expected_sha256: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pt or .pth checkpoint, read without running its code.

    The sha256 is checked against `expected_sha256` or, when not given, against the
    `<file>.sha256` beside it, on the same read that is parsed (`open_checked`); with
    neither, the file is loaded unchecked (both formats here are parsed without running
    code; the digest guards identity, not safety).
    A .pt/.pth whose pickle holds anything but tensors and plain containers (e.g. a
    __reduce__ payload) is refused with UnsafeCheckpointError, before any of it runs.
    A dict holding the state dict under "state_dict" or "model" is unwrapped.
    """
    return load_checked(path, expected_sha256=expected_sha256, map_location=map_location)[0]


def load_checked(path: str | Path, *, expected_sha256: str | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, the safetensors file's metadata or {}) from one read of the file,
    checked as `load_state_dict` says."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors, .pt or .pth")
    f, before = _open_checked(path, expected_sha256)
    with f:
        if path.suffix == ".safetensors":
            return _load_safetensors(f, before, path, map_location)
        return _load_pickled_state(f, path, map_location), {}


def _load_safetensors(f: BinaryIO, before: os.stat_result, path: Path,
                      map_location) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the open (checked) file `f`. On Linux through the open file
    descriptor (/proc/self/fd: memory-mapped, straight to `map_location`, whatever the
    path now names), refused if the file was written to since `before` (its stat ahead
    of the hash); elsewhere read whole into memory once (twice the file at the peak)."""
    fd_path = f"/proc/self/fd/{f.fileno()}"
    try:
        if os.path.exists(fd_path):
            state = load_file(fd_path, device=str(map_location))
            with safe_open(fd_path, framework="pt") as g:
                meta = dict(g.metadata() or {})
            after = os.fstat(f.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise CheckpointError(f"{path}: was written to while it was being checked and loaded; refused")
            return state, meta
        data = f.read()
        state = safetensors_load(data)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    return {k: v.to(map_location) for k, v in state.items()}, _safetensors_metadata(data, path)


def load_weights_only(f: BinaryIO, path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) of the open, seekable file `f` (named `path` in errors).

    What is not a torch file (by its first bytes: neither a zip archive nor a pickle
    stream) is a CheckpointError naming what it starts with: an HTML page, a git-lfs
    pointer, an empty file. A pickle torch refuses is scanned without running it
    (pickletools): a damaged or truncated one is a CheckpointError; a well-formed one that
    imports what weights-only loading does not allow is an UnsafeCheckpointError.
    """
    path = Path(path)
    head = f.read(64)
    f.seek(0)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        raise CheckpointError(f"{path}: not a torch checkpoint: {_what_it_starts_with(head)}")
    zipped = head.startswith(_ZIP_MAGIC)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = unpickler_reason(exc)
        f.seek(0)
        damage, imports = _scan_pickles(f, zipped=zipped)
        if damage is not None:
            raise _damaged(path, damage) from None
        foreign = [name for name in imports if not name.startswith(_TORCH_GLOBALS)]
        if "Unsupported operand" in reason and not foreign:
            # a well-formed pickle of tensors, in a protocol the weights-only loader lacks
            raise CheckpointError(f"{path}: a pickle torch's weights-only loader cannot read ({reason}); "
                                  "save the tensors with torch.save or safetensors") from None
        named = f"; it imports {', '.join(foreign[:5])}" if foreign else ""
        raise UnsafeCheckpointError(
            f"{path}: refused: its pickle holds objects other than tensors (it could run code "
            f"when loaded){named}; only weights-only checkpoints are accepted ({reason})"
        ) from None
    except Exception as exc:
        # torch's readers meet damaged bytes with many error types (RuntimeError for a
        # cut-off zip, IndexError or struct.error for a cut-off pickle, ...)
        f.seek(0)
        damage, _ = _scan_pickles(f, zipped=zipped)
        if damage is not None:
            raise _damaged(path, damage) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {first_line}") from None


def _damaged(path: Path, damage: str) -> CheckpointError:
    return CheckpointError(f"{path}: damaged or truncated torch checkpoint ({damage}); it was not saved or "
                           "copied completely: download or copy it again")


def _what_it_starts_with(head: bytes) -> str:
    """What a file that is not a torch checkpoint looks like, for the error message."""
    if not head:
        return "the file is empty (an interrupted download or copy?)"
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        guess = "a git-lfs pointer, not the file it stands for (fetch it with `git lfs pull`)"
    elif text.startswith(b"<"):  # <!DOCTYPE html>, <html>, <?xml ...>
        guess = "an HTML or XML page (a login or error page saved by a failed download?)"
    else:
        guess = "a failed download or a git-lfs pointer?"
    return f"starts with {head[:24]!r}, neither a zip archive nor a pickle: {guess}"


def _scan_pickles(f: BinaryIO, *, zipped: bool) -> tuple[str | None, list[str]]:
    """(why the torch file's pickle data is malformed, or None; the globals it imports,
    once each), read by pickletools without running anything. `zipped`: the torch zip
    format, whose pickle is the archive's data.pkl; else the legacy stream of pickles."""
    if zipped:
        try:
            with zipfile.ZipFile(f) as archive:
                names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if not names:
                    return "no data.pkl in the zip archive", []
                stream, count = io.BytesIO(archive.read(names[0])), 1
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"its zip archive cannot be read: {exc}", []
    else:
        stream, count = f, _LEGACY_PICKLES
    imports: list[str] = []
    for _ in range(count):
        start = stream.tell()
        if not stream.read(1):
            break  # the end of the file, after whole pickles
        stream.seek(start)
        recent: list[str] = []  # the last two strings pushed: STACK_GLOBAL's module and name
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    imports.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    # names fetched from the memo are not followed: "?" (unknown) then
                    imports.append(".".join(recent) if len(recent) == 2 else "?")
                if isinstance(arg, str):
                    recent = [*recent[-1:], arg]
        except ValueError as exc:  # unknown opcode, cut-off argument, no STOP
            return f"pickle data from byte {start}: {exc}", imports
    return None, list(dict.fromkeys(imports))


def _load_pickled_state(f: BinaryIO, path: Path, map_location) -> dict[str, torch.Tensor]:
    obj = load_weights_only(f, path, map_location)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """load_state_dict (strict) with an error naming the file and the keys that differ."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: {exc}") from None


def load_model(path: str | Path, *, expected_sha256: str | None = None, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint saved by `save_checkpoint` and load its weights.

    The architecture comes from the config recorded in the file, not from today's YAML,
    so a checkpoint keeps loading after the registered config changes.
    """
    from engine.models.families import build

    path = Path(path)
    # config and weights from one checked read (a .pt has no metadata: not ours)
    state, meta = load_checked(path, expected_sha256=expected_sha256, map_location=map_location)
    model = build(_config_of(meta, path))
    load_into(model, state, source=path)
    return model.to(map_location)
