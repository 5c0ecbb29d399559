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
- `add_loading_arguments` / `load_chat_model`: the options and the loading (checks, device, dtype,
  quantization) that demo/cli_demo.py and `python -m serve` share.
"""

import argparse
import json
import os
import re
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
MODEL_MODULES = (
    "configuration_chatglm.py",
    "modeling_chatglm.py",
    "chat_chatglm.py",
    "checkpoint_chatglm.py",
    "compat_chatglm.py",
    "quantization.py",
    "tokenization_chatglm.py",
)
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


# --- Loading a folder to chat with it: demo/cli_demo.py and `python -m serve` -------------------

BUNDLED_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CPU_KERNEL_HELP = (
    "the quantized layers' CPU kernel: auto (default: chatglm_cpu where it is installed, else torch), "
    "torch (exact weight-only), chatglm_cpu (pip install ./cpu_kernels: int8 activations, 1.5-2.6x faster "
    "int4 decoding) or onnxruntime; also for a quantized checkpoint as stored"
)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device_name(text):
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def add_loading_arguments(parser):
    """--model-path, --quantize, --cpu-kernel, --device, --dtype: what `load_chat_model` reads."""
    parser.add_argument(
        "--model-path",
        type=Path,
        default=BUNDLED_MODEL,
        help="model folder with this package's code files, config, tokenizer.model and weights (default: the bundled demo model)",
    )
    parser.add_argument("--quantize", type=int, choices=(0, 4, 8), default=0, help="quantize the weights to 4 or 8 bits after loading (0: no)")
    parser.add_argument("--cpu-kernel", help=CPU_KERNEL_HELP)
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on cpu, bfloat16 (or float16) on cuda, float16 on mps")


def check_model_folder(folder):
    """Raise ModelFolderError naming what is missing, before transformers fails with a long traceback."""
    if not folder.exists():
        raise ModelFolderError(f"--model-path {folder}: no such folder")
    if not folder.is_dir():
        raise ModelFolderError(f"--model-path {folder}: not a folder")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelFolderError(f"{folder / CONFIG_FILE} is missing: not a model folder")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ModelFolderError(f"{folder / TOKENIZER_FILE} is missing: the tokenizer needs it")
    for name in MODEL_MODULES:
        code = folder / name
        if not code.is_file():
            raise ModelFolderError(f"{code} is missing: make the folder with tools/upgrade_checkpoint.py")
        text = code.read_text(encoding="utf-8", errors="replace").strip()
        if text.endswith(".py") and "\n" not in text:
            # git writes a symlink it could not create as a one-line file holding the target path.
            raise ModelFolderError(
                f"{code} is a placeholder for a symlink to {text}: clone with symlinks enabled "
                "(on Windows: git clone -c core.symlinks=true)"
            )
    check_weights(folder)  # a truncated or corrupt file is named here, not in a long traceback


def pick_device(name):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelFolderError(f"--device {name}: this machine (or this torch build) has no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelFolderError("--device mps: Apple's MPS backend is not available here")
    return name


def pick_dtype(name, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    # Half precision on CPUs is slow or unsupported in places; float32 is the safe choice.
    return torch.float32


def load_chat_model(args):
    """(tokenizer, model in eval mode on its device) for the options of `add_loading_arguments`;
    ModelFolderError names what is wrong with the folder or the options."""
    check_model_folder(args.model_path)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    # Imported here so that --help and argument errors answer at once.
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=True)
        model = AutoModel.from_pretrained(args.model_path, trust_remote_code=True, dtype=dtype)
        if args.quantize or args.cpu_kernel:
            # Layer by layer onto the device: the float model never has to fit there whole. The
            # model checks the kernel's name (a bad one is a ValueError naming the choices).
            model = model.quantize(args.quantize, device=device, cpu_kernel=args.cpu_kernel)
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"cannot load {args.model_path}: {first_line(error)}") from None
    return tokenizer, model.to(device).eval()
