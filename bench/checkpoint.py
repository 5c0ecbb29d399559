"""Random-weight ChatGLM2 checkpoints in the released layouts, written once and cached on disk.

Each tensor is a pure function of (seed, name, shape), generated and written one at a time, so memory
stays bounded by one shard and the int4/int8 files are exactly the quantization of the fp16 shards.
A folder is reused while its marker file matches the shapes, seed and layout asked for.
"""

import importlib.util
import json
import shutil
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from tools.model_folder import copy_package_files

from .model_shapes import REPO_ROOT, release_tensors, shape_summary

MARKER = "bench-checkpoint.json"
# Bump when the bytes written for the same (seed, shapes) change, so stale caches are rewritten.
FORMAT_VERSION = 1
# The release's shard size: 2 GB per `pytorch_model-0000i-of-00007.bin`.
SHARD_LIMIT_BYTES = 2_000_000_000
INITIALIZER_STD = 0.02
CHECKPOINT_DTYPE = torch.float16  # the release's dtype (spec §2 and §6)


def random_tensor(spec, seed):
    if spec.init == "inv_freq":
        # Stored in fp16 like every other tensor: the release's total_size (12,487,168,064) counts it so.
        rotary_dim = 2 * spec.shape[0]
        return (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))).to(CHECKPOINT_DTYPE)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=CHECKPOINT_DTYPE)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return torch.empty(spec.shape, dtype=CHECKPOINT_DTYPE).normal_(0.0, INITIALIZER_STD, generator=generator)


def _marker_content(layout, config, seed):
    return {"format_version": FORMAT_VERSION, "layout": layout, "seed": seed, "shapes": shape_summary(config)}


def _cached(folder, expected):
    """True when `folder` holds a complete checkpoint written for `expected` (its marker says so)."""
    marker = folder / MARKER
    if not marker.exists():
        return False
    written = json.loads(marker.read_text())
    files = written.pop("files", {})
    if written != expected:
        return False
    return all((folder / name).exists() and (folder / name).stat().st_size == size for name, size in files.items())


def _start(folder):
    """Empty `folder` of any earlier (stale or partial) checkpoint before writing a new one."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _finish(folder, expected, file_names):
    content = dict(expected, files={name: (folder / name).stat().st_size for name in file_names})
    (folder / MARKER).write_text(json.dumps(content, indent=2))


def _save(obj, path):
    """torch.save through a temporary name, so an interrupted write never looks like a finished file."""
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    partial.rename(path)


def ensure_fp16_shards(folder, config, seed):
    """The fp16 release layout: `pytorch_model-0000i-of-0000n.bin` of at most 2 GB plus the index."""
    folder = Path(folder)
    expected = _marker_content("fp16-shards", config, seed)
    if _cached(folder, expected):
        return folder
    _start(folder)
    tensors = release_tensors(config)
    shards, current, current_bytes = [], [], 0
    for spec in tensors:
        size = spec.numel * 2
        if current and current_bytes + size > SHARD_LIMIT_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += size
    shards.append(current)

    total_bytes = sum(spec.numel * 2 for spec in tensors)
    weight_map, written_bytes, file_names = {}, 0, []
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"fp16 shards -> {folder}") as progress:
        for index, shard_specs in enumerate(shards):
            shard_name = f"pytorch_model-{index + 1:05d}-of-{len(shards):05d}.bin"
            shard = {}
            for spec in shard_specs:
                shard[spec.name] = random_tensor(spec, seed)
                written_bytes += shard[spec.name].nbytes
                weight_map[spec.name] = shard_name
                progress.update(spec.numel * 2)
            _save(shard, folder / shard_name)
            file_names.append(shard_name)
            del shard
    index = {"metadata": {"total_size": written_bytes}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    _finish(folder, expected, file_names + ["pytorch_model.bin.index.json"])
    return folder


def load_quantize_weight():
    """The package's own packing function, `quantization.quantize_weight(weight, bits) -> (qweight, scale)`."""
    path = REPO_ROOT / "quantization.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; int4/int8 checkpoints are packed by its quantize_weight")
    module_spec = importlib.util.spec_from_file_location("chatglm_quantization_for_bench", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "quantize_weight"):
        raise AttributeError(f"{path} defines no quantize_weight(weight, bits); cannot pack int4/int8 checkpoints")
    return module.quantize_weight


def _check_packed(name, weight, qweight, scale, bits):
    out_features, in_features = weight.shape
    expected_shape = (out_features, in_features * bits // 8)
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != expected_shape:
        raise ValueError(
            f"quantize_weight({name}, bits={bits}) returned {qweight.dtype} {tuple(qweight.shape)}; "
            f"the released format (spec §6) is int8 {expected_shape}"
        )
    if tuple(scale.shape) != (out_features,):
        raise ValueError(f"quantize_weight({name}, bits={bits}) returned a scale of shape {tuple(scale.shape)}, not ({out_features},)")


def ensure_quantized_file(folder, config, seed, bits):
    """The int4 release layout (spec §6), at 4 or 8 bits: one `pytorch_model.bin` of the quantized fp16 shards.

    torch.save needs every tensor of the file at once; to keep memory bounded each finished tensor is
    first saved to a scratch file and the final file is written from memory-mapped scratch tensors.
    """
    folder = Path(folder)
    expected = _marker_content(f"int{bits}-file", config, seed)
    if _cached(folder, expected):
        return folder
    quantize_weight = load_quantize_weight()
    _start(folder)
    scratch = folder / "scratch"
    scratch.mkdir()
    tensors = release_tensors(config)
    scratch_files = []
    with tqdm(total=sum(spec.numel for spec in tensors), unit="weight", unit_scale=True, desc=f"int{bits} file -> {folder}") as progress:
        for spec in tensors:
            weight = random_tensor(spec, seed)
            if spec.quantized:
                qweight, scale = quantize_weight(weight, bits)
                _check_packed(spec.name, weight, qweight, scale, bits)
                pieces = {spec.name: qweight.contiguous(), spec.name + "_scale": scale.to(CHECKPOINT_DTYPE).contiguous()}
            else:
                pieces = {spec.name: weight}
            for name, tensor in pieces.items():
                path = scratch / f"{len(scratch_files)}.pt"
                torch.save(tensor, path)
                scratch_files.append((name, path))
            progress.update(spec.numel)
    state_dict = {name: torch.load(path, mmap=True, weights_only=True) for name, path in scratch_files}
    _save(state_dict, folder / "pytorch_model.bin")
    del state_dict
    shutil.rmtree(scratch)
    _finish(folder, expected, ["pytorch_model.bin"])
    return folder


def prepare_model_folder(weights_folder, config, quantization_bit=0):
    """Put the current code files and a config beside cached weights: the folder a user loads.

    The code is copied on every run (the weights stay), so the measurement is of the code as it is now.
    """
    weights_folder = Path(weights_folder)
    copy_package_files(weights_folder)
    folder_config = dict(config)
    if quantization_bit:
        folder_config["quantization_bit"] = quantization_bit
    (weights_folder / "config.json").write_text(json.dumps(folder_config, indent=2))
    return weights_folder


def cache_root(cache_dir, quick, seed):
    return Path(cache_dir) / f"{'quick' if quick else 'chatglm2-6b'}-seed{seed}"


def model_folder(root, config, seed, bits):
    """A loadable model folder: fp16 shards for bits=16, else the int8/int4 file; written if not cached."""
    if bits == 16:
        return prepare_model_folder(ensure_fp16_shards(Path(root) / "fp16", config, seed), config)
    return prepare_model_folder(ensure_quantized_file(Path(root) / f"int{bits}", config, seed, bits), config, bits)
