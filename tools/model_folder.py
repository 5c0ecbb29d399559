"""What a ChatGLM2 model folder holds, found, read and written one way by every tool beside the package.

demo/, bench/, tests/ and tools/ import this module (with the repository root on `sys.path`) rather
than list the package files or look for weights themselves. The model modules at the root never
import it: transformers copies them flat into its module cache, without this folder.

- `PACKAGE_FILES`: what a model folder needs from this repository; `copy_package_files` puts them there.
- `weight_files` / `check_weights`: the weight files transformers loads from a folder, in its order,
  and a check that each one reads and agrees with its index.
- `check_destination` / `staged_folder`: a tool's output folder is never its source (symlinks
  resolved) and appears only complete, renamed into place from a temporary folder beside it.
- `ModelFolderError`, `exit_status` and the statuses it returns: errors as one line naming the file.
"""

import json
import os
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Every Python module at the repository root (tests/test_model_folder.py checks that none is left
# out), and the json files that go beside them. Not config.json: a checkpoint keeps its own shapes
# and takes only `auto_map` from the repository's.
MODEL_MODULES = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py")
PACKAGE_JSON_FILES = ("tokenizer_config.json", "generation_config.json")
PACKAGE_FILES = MODEL_MODULES + PACKAGE_JSON_FILES
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
# transformers' precedence (4.57 and 5.x alike): of these, it loads the first the folder holds.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")

# Exit statuses of the tools and the demo (0: done); each failure is one line on stderr.
WRITE_FAILED = 1  # the output could not be written (disk full, permissions); no partial output is left
USAGE_ERROR = 2  # bad arguments, or a model folder refused or unreadable
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class ModelFolderError(Exception):
    """A model folder, or a file in it, cannot be used; the message names the file and the problem."""


def exit_status(work):
    """Run `work()` (a tool's whole job) and return its exit status, each failure told in one line on stderr."""
    try:
        work()
    except ModelFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return WRITE_FAILED
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return INTERRUPTED
    return 0


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: cannot read it as JSON ({first_line(error)})") from None


def is_weight_file(name):
    return name.endswith(WEIGHT_SUFFIXES)


def _index_weight_map(index_path):
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{index_path}: no weight_map")
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ModelFolderError(f"{index_path}: shard name {shard!r} is not a file beside it")
    return weight_map


def weight_files(folder):
    """Names of the weight files transformers would load from `folder`: an index then its shards, or one file."""
    folder = Path(folder)
    name = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if name is None:
        raise ModelFolderError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not name.endswith(".index.json"):
        return [name]
    shards = sorted(set(_index_weight_map(folder / name).values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise ModelFolderError(f"{folder / shard} is missing, but {name} names it")
    return [name, *shards]


@contextmanager
def _reading(path):
    try:
        yield
    except Exception as error:  # whatever the reader raises, the user needs the file's name
        raise ModelFolderError(f"{path}: cannot read its weights, the file is truncated or corrupt ({first_line(error)})") from None


def load_weights(path):
    """Every tensor of one weight file (memory-mapped from a torch zip file); ModelFolderError naming the file if it cannot be read."""
    path = Path(path)
    with _reading(path):
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        import torch

        # Only the zip format can be memory-mapped; older pickles are read whole.
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    if not isinstance(state, dict):
        raise ModelFolderError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def tensor_names(path):
    """The tensor names one weight file holds, read lazily (a safetensors header, a memory-mapped pickle).

    ModelFolderError naming the file when it cannot be read: truncated, corrupt, or not weights.
    """
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        return list(load_weights(path))
    from safetensors import safe_open

    with _reading(path), safe_open(path, framework="pt") as file:
        return list(file.keys())


def check_weights(folder):
    """`weight_files(folder)` after reading each file and checking that the index lists what its shards hold."""
    folder = Path(folder)
    names = weight_files(folder)
    if len(names) == 1:
        tensor_names(folder / names[0])
        return names
    index_name, *shards = names
    weight_map = _index_weight_map(folder / index_name)
    for shard in shards:
        listed = {key for key, file in weight_map.items() if file == shard}
        stored = set(tensor_names(folder / shard))
        if listed - stored:
            raise ModelFolderError(f"{folder / index_name} puts {min(listed - stored)} in {shard}, which does not hold it")
        if stored - listed:
            raise ModelFolderError(f"{folder / shard} holds {min(stored - listed)}, which {index_name} does not list there")
    return names


def replace_file(source, target):
    """Copy `source` to `target`; a link at `target` is replaced, never written through."""
    if target.is_symlink() or target.exists():
        target.unlink()
    shutil.copyfile(source, target)


def copy_package_files(folder):
    """This repository's PACKAGE_FILES into `folder`."""
    for name in PACKAGE_FILES:
        replace_file(REPO_ROOT / name, Path(folder) / name)


def default_mode(directory=False):
    """The mode `open()` (or `mkdir`) gives a new file (or folder) here: 0o666 (0o777) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_destination(destination, source, source_files, force):
    """DST with symlinks resolved, once it is known that writing it cannot touch SRC.

    Refused with ModelFolderError: DST is SRC, lies inside it or holds it, or the same for the
    folder any of `source_files` (names in SRC) really lives in; DST is not a folder; DST is not
    empty and `force` is not given.
    """
    dst = Path(os.path.realpath(destination))
    places = [(Path(os.path.realpath(source)), f"SRC {source}")]
    places += [(Path(os.path.realpath(Path(source) / name)).parent, f"the folder of SRC's {name}") for name in source_files]
    for place, what in places:
        if dst == place:
            raise ModelFolderError(f"DST {destination} is {what}: write to another folder")
        if place in dst.parents:
            raise ModelFolderError(f"DST {destination} lies inside {what}: write to another folder")
        if dst in place.parents:
            raise ModelFolderError(f"{what} lies inside DST {destination}: write to another folder")
    if dst.exists() and not dst.is_dir():
        raise ModelFolderError(f"DST {destination} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ModelFolderError(f"DST {destination} is not empty: pass --force to replace it")
    return dst


@contextmanager
def staged_folder(destination):
    """An empty folder beside `destination` to write into; it becomes `destination` when the block ends.

    If the block raises (or Ctrl-C), the partial folder is removed and `destination` is left as it
    was. An existing `destination` (`check_destination` allowed it) is swapped out only once the new
    folder is complete; its entries the new folder does not replace, except stale weight files,
    move into the new one (a user's notes survive --force), and the rest is deleted. Links are
    removed as links: nothing is deleted or written through them.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        staging.chmod(destination.stat().st_mode & 0o7777 if destination.is_dir() else default_mode(directory=True))
        yield staging
        if destination.is_dir():
            _swap(destination, staging)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap(destination, staging):
    trash = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    old = trash / destination.name
    destination.rename(old)
    kept = []
    try:
        for entry in sorted(old.iterdir()):
            target = staging / entry.name
            if not (target.exists() or target.is_symlink() or is_weight_file(entry.name)):
                entry.rename(target)
                kept.append(entry.name)
        staging.rename(destination)
    except BaseException:
        for name in kept:
            (staging / name).rename(old / name)
        old.rename(destination)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash)
