"""tools/model_folder.py, and what the tools built on it do to their source and destination folders.

Both converters (upgrade_checkpoint.py, quantize_checkpoint.py) run against every layout in which
writing DST could touch SRC; the sha256 of every file SRC reaches is the same afterwards.
"""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tiny_checkpoint import REPO_ROOT, random_model, write_released_shards
from tools import model_folder, quantize_checkpoint, upgrade_checkpoint
from tools.model_folder import (
    MODEL_MODULES,
    PACKAGE_FILES,
    PACKAGE_JSON_FILES,
    ModelFolderError,
    check_weights,
    weight_files,
)

VOCAB = 2048  # the conftest tokenizer's 2005 ids, padded


TOOLS = {"upgrade": upgrade_checkpoint, "quantize": quantize_checkpoint}


def run(tool, src, dst, *flags):
    args = [str(src), str(dst), *flags]
    return TOOLS[tool].main(args + ["--bits", "4"] if tool == "quantize" else args)


def test_package_files_name_every_root_module_and_json_file():
    """transformers copies the root's modules flat: a module the list forgets is missing from every folder the tools write."""
    assert sorted(MODEL_MODULES) == sorted(path.name for path in REPO_ROOT.glob("*.py"))
    assert sorted(PACKAGE_JSON_FILES + ("config.json",)) == sorted(path.name for path in REPO_ROOT.glob("*.json"))
    assert PACKAGE_FILES == MODEL_MODULES + PACKAGE_JSON_FILES


def touch(folder, *names):
    for name in names:
        (folder / name).write_text("{}")


@pytest.mark.parametrize(
    "present, loaded",
    [
        # transformers' order: safetensors before .bin, and of each the single file before the index.
        (("model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json"), "model.safetensors"),
        (("model.safetensors.index.json", "pytorch_model.bin"), "model.safetensors.index.json"),
        (("model.safetensors", "model.safetensors.index.json"), "model.safetensors"),
        (("pytorch_model.bin", "pytorch_model.bin.index.json"), "pytorch_model.bin"),
    ],
)
def test_weight_files_follow_transformers_precedence(tmp_path, present, loaded):
    touch(tmp_path, *present)
    if loaded.endswith(".index.json"):
        (tmp_path / loaded).write_text(json.dumps({"weight_map": {"a": "shard.safetensors"}}))
        touch(tmp_path, "shard.safetensors")
        assert weight_files(tmp_path) == [loaded, "shard.safetensors"]
    else:
        assert weight_files(tmp_path) == [loaded]


def test_weight_files_refuse_an_empty_folder_and_an_index_pointing_outside(tmp_path):
    with pytest.raises(ModelFolderError, match="holds no weights"):
        weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(ModelFolderError, match="not a file beside it"):
        weight_files(tmp_path)


def save_sharded_safetensors(folder, shards, weight_map):
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_check_weights_reads_every_file_and_matches_the_index(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    save_sharded_safetensors(tmp_path, {"s1.safetensors": {"a": tensors["a"]}, "s2.safetensors": {"b": tensors["b"]}}, {"a": "s1.safetensors", "b": "s2.safetensors"})
    assert check_weights(tmp_path) == ["model.safetensors.index.json", "s1.safetensors", "s2.safetensors"]

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(ModelFolderError, match=r"puts b in s1\.safetensors, which does not hold it"):
        check_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    save_file(tensors, tmp_path / "s1.safetensors")
    with pytest.raises(ModelFolderError, match=r"s1\.safetensors holds b, which model\.safetensors\.index\.json does not list"):
        check_weights(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_truncated_weight_file_is_named(tmp_path, name):
    path = tmp_path / name
    tensors = {"a": torch.randn(64, 64)}
    save_file(tensors, path) if name.endswith(".safetensors") else torch.save(tensors, path)
    assert check_weights(tmp_path) == [name]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFolderError) as error:
        check_weights(tmp_path)
    assert str(error.value).startswith(f"{path}: cannot read its weights, the file is truncated or corrupt (")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def release(tmp_path_factory, sentencepiece_model_path):
    """A float16 ChatGLM2 laid out as the release ships it (sharded .bin files, tokenizer.model)."""
    folder = tmp_path_factory.mktemp("release") / "chatglm2-6b"
    model = random_model(folder, VOCAB, add_qkv_bias=True, torch_dtype="float16").half()
    write_released_shards(model.state_dict(), folder, num_shards=2)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return folder


def digests(folder):
    """sha256 of every file under `folder`, read through links: what a tool writing through one would change."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def source(release, tmp_path):
    """A private copy of the release (tests change the folders around it), and its digests."""
    src = tmp_path / "release"
    shutil.copytree(release, src)
    return src, digests(src)


def upgraded(src, dst):
    assert TOOLS["upgrade"].main([str(src), str(dst)]) == 0
    assert (dst / "tokenizer.model").is_symlink() and (dst / "pytorch_model.bin.index.json").is_symlink()
    return dst


def dst_is_src(src, tmp_path):
    return src


def dst_inside_src(src, tmp_path):
    return src / "converted"


def src_inside_dst(src, tmp_path):
    return src.parent


def dst_links_to_src(src, tmp_path):
    (tmp_path / "link").symlink_to(src)
    return tmp_path / "link"


REFUSED_LAYOUTS = {
    "SRC SRC": (dst_is_src, "is SRC"),
    "DST inside SRC": (dst_inside_src, "lies inside SRC"),
    "SRC inside DST": (src_inside_dst, "lies inside DST"),
    "DST a link to SRC": (dst_links_to_src, "is SRC"),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("layout", sorted(REFUSED_LAYOUTS))
def test_tools_refuse_to_write_into_their_source(tool, layout, source, tmp_path, capsys):
    src, before = source
    make_dst, reason = REFUSED_LAYOUTS[layout]
    dst = make_dst(src, tmp_path)
    around = sorted(path.name for path in tmp_path.iterdir())
    assert run(tool, src, dst, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and reason in err, err
    assert digests(src) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == around, "nothing written beside either"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_force_over_an_upgraded_folder_replaces_its_links(tool, source, tmp_path):
    """DST made by upgrade_checkpoint links to the release's files: --force replaces the links, never writes through them."""
    src, before = source
    dst = upgraded(src, tmp_path / "dst")
    (dst / "notes.txt").write_text("mine")
    assert run(tool, src, dst, "--force") == 0
    assert digests(src) == before
    assert (dst / "notes.txt").read_text() == "mine", "files the tool does not write stay"
    if tool == "quantize":
        assert not any(path.is_symlink() for path in dst.iterdir())
        assert not (dst / "pytorch_model.bin.index.json").exists(), "stale weights would be loaded beside the new ones"
        assert json.loads((dst / "config.json").read_text())["quantization_bit"] == 4
    assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tools_refuse_a_destination_holding_the_files_their_source_links_to(tool, source, tmp_path, capsys):
    """SRC made by upgrade_checkpoint, DST the release its links point into: replacing DST would delete SRC's weights."""
    release, before = source
    src = upgraded(release, tmp_path / "upgraded")
    assert run(tool, src, release, "--force") == 2
    assert "the folder of SRC's tokenizer.model" in capsys.readouterr().err
    assert digests(release) == before


def test_a_failure_half_way_leaves_the_old_destination_as_it_was(source, tmp_path, monkeypatch, capsys):
    src, before = source
    dst = tmp_path / "dst"
    assert run("quantize", src, dst) == 0
    written = digests(dst)
    load_weights = model_folder.load_weights

    def second_shard_fails(path):
        if path.name.startswith("pytorch_model-00002-"):
            raise ModelFolderError(f"{path}: cannot read its weights (simulated)")
        return load_weights(path)

    monkeypatch.setattr(quantize_checkpoint, "load_weights", second_shard_fails)
    assert run("quantize", src, dst, "--force") == 2
    assert "pytorch_model-00002-of-00002.bin: cannot read its weights (simulated)" in capsys.readouterr().err
    assert digests(dst) == written and digests(src) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dst", "release"], "no partial folder left"

    assert run("quantize", src, tmp_path / "new") == 2
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*")), "a new DST is not left half written"


def test_staged_folder_gets_the_mode_of_a_new_folder(tmp_path):
    with model_folder.staged_folder(tmp_path / "out") as folder:
        (folder / "a").write_text("a")
    assert (tmp_path / "out" / "a").read_text() == "a"
    assert (tmp_path / "out").stat().st_mode & 0o777 == model_folder.default_mode(directory=True)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_replace_file_replaces_a_link_not_its_target(tmp_path):
    target = tmp_path / "theirs"
    target.write_text("original")
    (tmp_path / "link").symlink_to(target)
    source = tmp_path / "new"
    source.write_text("new")
    model_folder.replace_file(source, tmp_path / "link")
    assert target.read_text() == "original"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link").read_text() == "new"
    assert os.path.exists(target)


@pytest.mark.parametrize(
    "failure, status, message",
    [
        (KeyboardInterrupt(), model_folder.INTERRUPTED, "interrupted: no output was written"),
        (OSError(28, "No space left on device"), model_folder.WRITE_FAILED, "error: [Errno 28] No space left on device"),
    ],
)
def test_ctrl_c_or_a_full_disk_while_writing_is_one_line_and_leaves_no_output(failure, status, message, source, tmp_path, monkeypatch, capsys):
    src, before = source

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(quantize_checkpoint, "save_file", fail)
    assert run("quantize", src, tmp_path / "out") == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["release"]
    assert digests(src) == before
