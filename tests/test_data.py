"""Tests for the byte tokenizer, preprocessing into Megatron indexed datasets, and GPT datasets."""

import bz2
import errno
import gzip
import hashlib
import itertools
import json
import lzma
import os
import random
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from dsmoe_megatron import data
from dsmoe_megatron.tokenizer import EOD_TOKEN, ByteTokenizer, write_hf_tokenizer

TOKENIZER = ByteTokenizer()
TEXTS = [
    "Hello, world!",
    "naïve café, Grüße, 日本語, emoji 🙂 and a tab\there",
    "  leading and trailing spaces  \n",
    f"a literal {EOD_TOKEN} stays as bytes",
    "",
]


def write_paragraphs(path, paragraphs):
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return str(path)


def make_prefix(tmp_path, name, paragraphs):
    source = write_paragraphs(tmp_path / f"{name}.txt", paragraphs)
    return data.preprocess([source], tmp_path / name, min_document_chars=1)


def numbered_paragraphs(tag, count, size=120):
    return [f"{tag} paragraph {i}: " + (f"{tag}{i} " * size)[:size] for i in range(count)]


@pytest.fixture(scope="module")
def corpus_prefix(tmp_path_factory):
    return data.default_corpus_prefix(tmp_path_factory.mktemp("corpus_cache"))


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(text):
    ids = TOKENIZER.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOKENIZER.detokenize(ids) == text


def test_tokenizer_special_tokens():
    specials = {TOKENIZER.eod, TOKENIZER.bos, TOKENIZER.pad}
    assert len(specials) == 3 and specials == set(range(256, TOKENIZER.vocab_size))
    assert TOKENIZER.eos == TOKENIZER.eod
    assert TOKENIZER.detokenize([TOKENIZER.bos, *b"hi", TOKENIZER.eod, TOKENIZER.pad]) == "hi"
    assert TOKENIZER.vocab[EOD_TOKEN] == TOKENIZER.eod
    assert TOKENIZER.inv_vocab[TOKENIZER.eod] == EOD_TOKEN


def test_hf_tokenizer_files_round_trip(tmp_path):
    pytest.importorskip("tokenizers", reason="optional 'tokenizers' package not installed")
    transformers = pytest.importorskip(
        "transformers", reason="optional 'transformers' package not installed"
    )
    write_hf_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == TOKENIZER.tokenize(text), text
        assert hf.decode(ids) == text
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (
        TOKENIZER.eod, TOKENIZER.bos, TOKENIZER.pad,
    )
    assert len(hf) == TOKENIZER.vocab_size


# --- preprocessing ---------------------------------------------------------------------------


def test_readme_trains_on_the_dataset_it_preprocesses():
    """The README's commands in order: data_path names what dsmoe-preprocess wrote (it adds no
    "_text_document" to the prefix, as Megatron-LM's preprocess_data.py does)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    prefixes = re.findall(r"dsmoe-preprocess --input .*? --output-prefix (\S+)", readme)
    assert prefixes
    for prefix in prefixes:
        assert f"data_path=[{prefix}]" in readme, prefix


def test_preprocess_reads_back_exact_ids(tmp_path):
    first = ["First paragraph.", "Second one, with ünïcödé ✓.", "Third\nspans two lines."]
    second = ["Another file's only paragraph."]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["json doc 🙂", "two"]) + "\n")
    inputs = [
        write_paragraphs(tmp_path / "a.txt", first),
        write_paragraphs(tmp_path / "b.txt", second),
        str(jsonl),
    ]
    prefix = data.preprocess(inputs, tmp_path / "out" / "ds", min_document_chars=1)
    dataset = data.open_indexed_dataset(prefix)
    documents = first + second + ["json doc 🙂", "two"]
    assert len(dataset) == len(documents)
    for i, text in enumerate(documents):
        assert dataset[i].tolist() == TOKENIZER.tokenize(text) + [TOKENIZER.eod]
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]  # no temp files left

    data.preprocess(inputs[:1], prefix, append_eod=False, min_document_chars=1, force=True)
    # Keep the dataset referenced while reading: its arrays are views of a mmap closed on deletion.
    without_eod = data.open_indexed_dataset(prefix)
    assert without_eod[0].tolist() == TOKENIZER.tokenize(first[0])


def test_preprocess_reads_json_lines_by_any_of_its_names_and_drops_a_bom(tmp_path):
    """.json is Megatron-LM's name for JSON lines; the suffix's case does not matter; a UTF-8
    byte-order mark (Windows editors) is not text."""
    for name in ("a.json", "b.JSONL"):
        (tmp_path / name).write_text(json.dumps({"text": "one"}) + "\n", encoding="utf-8-sig")
    (tmp_path / "c.txt").write_text("two", encoding="utf-8-sig")
    prefix = data.preprocess([str(tmp_path / n) for n in ("a.json", "b.JSONL", "c.txt")],
                             tmp_path / "out", min_document_chars=1)
    dataset = data.open_indexed_dataset(prefix)
    expected = [TOKENIZER.tokenize(t) + [TOKENIZER.eod] for t in ("one", "one", "two")]
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected


def test_preprocess_refuses_json_lines_named_as_text(tmp_path):
    """.ndjson is JSON lines; JSON lines under a text name would be trained on as raw JSON."""
    (tmp_path / "a.ndjson").write_text(json.dumps({"text": "one"}) + "\n")
    dataset = data.open_indexed_dataset(data.preprocess([tmp_path / "a.ndjson"], tmp_path / "a"))
    assert dataset[0].tolist() == TOKENIZER.tokenize("one") + [TOKENIZER.eod]
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b'{"content": "two"}\n{"content": "x"}\n'))
    with pytest.raises(ValueError, match=r"b\.txt\.gz looks like JSON lines \(its first non-blank "
                                         r"line is a JSON object\) but is read as plain text"):
        data.preprocess([tmp_path / "b.txt.gz"], tmp_path / "b")
    assert not list(tmp_path.glob("b.bin*"))
    # Blank lines (and a byte-order mark) before the first record hid it.
    (tmp_path / "d.txt").write_bytes(b'\xef\xbb\xbf\n \r\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=r"d\.txt looks like JSON lines"):
        data.preprocess([tmp_path / "d.txt"], tmp_path / "d")
    (tmp_path / "c.txt").write_text("{braces} in prose\n\n{}x\n")  # text is still text
    data.preprocess([tmp_path / "c.txt"], tmp_path / "c")


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
])
def test_preprocess_reads_compressed_inputs(tmp_path, suffix, compress):
    documents = ["json doc 🙂", "two\r\nlines"]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in documents).encode()
    (tmp_path / f"a.jsonl{suffix}").write_bytes(compress(jsonl))
    (tmp_path / f"b.TXT{suffix}").write_bytes(compress("plain paragraph ✓\n".encode()))
    prefix = data.preprocess([tmp_path / f"a.jsonl{suffix}", tmp_path / f"b.TXT{suffix}"],
                             tmp_path / "out", min_document_chars=1)
    dataset = data.open_indexed_dataset(prefix)
    expected = [list(t.encode()) + [TOKENIZER.eod] for t in documents + ["plain paragraph ✓"]]
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected

    (tmp_path / f"cut.jsonl{suffix}").write_bytes(compress(jsonl * 50)[:-20])
    with pytest.raises(ValueError, match=rf"cut\.jsonl\{suffix} cannot be decompressed"):
        data.preprocess([tmp_path / f"cut.jsonl{suffix}"], tmp_path / "cut")
    assert not list(tmp_path.glob("cut.bin*")) and not list(tmp_path.glob("cut.idx*"))


def test_preprocess_names_a_compression_it_does_not_read(tmp_path):
    """The Pile ships .jsonl.zst: say so rather than only that it is not UTF-8."""
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd\x04\x58\x61\x00")
    with pytest.raises(ValueError, match=r"a\.jsonl\.zst is not UTF-8 text \(.*\); \.zst files are "
                                         r"not read: decompress it, or compress it as \.gz"):
        data.preprocess([tmp_path / "a.jsonl.zst"], tmp_path / "out")


def test_preprocess_merges_short_paragraphs(tmp_path):
    paragraphs = ["x" * 30] * 10
    source = write_paragraphs(tmp_path / "short.txt", paragraphs)
    dataset = data.open_indexed_dataset(
        data.preprocess([source], tmp_path / "merged", min_document_chars=100)
    )
    assert len(dataset) == 3  # 4 + 4 + 2 paragraphs
    assert dataset[0].tolist() == TOKENIZER.tokenize("\n\n".join(paragraphs[:4])) + [TOKENIZER.eod]


def test_txt_paragraphs_are_the_pieces_between_blank_lines(tmp_path):
    """Read line by line, a .txt file splits as the rule reads on the whole text: at a newline
    and the blank line (spaces and tabs only) after it; CR / CRLF read as newlines."""
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\n", "\r", "\r\n", "é", "\x0c"]
    source = tmp_path / "t.txt"
    for _ in range(2000):
        source.write_bytes("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                          .encode())
        with open(source, encoding="utf-8") as f:
            expected = re.split(r"\n[ \t]*\n", f.read())
        with open(source, encoding="utf-8") as f:
            assert list(data._paragraphs(f, str(source))) == expected, source.read_bytes()


def test_preprocess_reads_a_large_txt_file_in_bounded_memory(tmp_path):
    """A .txt file is not read whole: preprocessing 8 MB holds a small part of it at a time
    (Python allocations traced; torch's tensors are not, and are per document)."""
    paragraph = ("word " * 60 + "\n") * 3
    count = 8_000_000 // (len(paragraph) + 1)
    source = tmp_path / "big.txt"
    source.write_text("\n".join([paragraph] * count))
    tracemalloc.start()
    try:
        dataset = data.open_indexed_dataset(data.preprocess([source], tmp_path / "big"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < source.stat().st_size / 8, peak
    merged = "\n\n".join([paragraph.strip("\n")] * 3)  # 3 x 903 chars >= 2000
    assert len(dataset) == -(-count // 3)
    assert dataset[0].tolist() == TOKENIZER.tokenize(merged) + [TOKENIZER.eod]


def test_preprocess_names_a_nul_byte_deep_in_a_txt_file_and_writes_nothing(tmp_path):
    source = tmp_path / "late.txt"
    source.write_bytes(b"a paragraph\n\n" * 100_000 + b"then\0binary\n")
    with pytest.raises(ValueError, match=r"late\.txt holds NUL bytes \(first on line 200001\)"):
        data.preprocess([source], tmp_path / "out", min_document_chars=1)
    assert sorted(os.listdir(tmp_path)) == ["late.txt"]


@pytest.mark.parametrize("name, line, byte", [("late.txt", b"line of text\n", 6),
                                              ("late.jsonl.gz", b'{"text": "ok"}\n', 11)])
def test_preprocess_names_the_line_of_a_byte_that_is_not_utf8(tmp_path, name, line, byte):
    """A Latin-1 byte deep in a file: the decoder's position is one in its read buffer (6051
    for the .txt), which sends the reader to the wrong place; the line and its byte are named."""
    text = line * 20_000 + line.replace(b"o", "\xe9".encode("latin-1"), 1)
    source = tmp_path / name
    source.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text.*\(byte 0xe9 on line "
                                         rf"20001, byte {byte}\); convert it to UTF-8"):
        data.preprocess([source], tmp_path / "out", min_document_chars=1)


def test_preprocess_missing_input_names_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*--input"):
        data.preprocess([missing], tmp_path / "out")
    assert not os.listdir(tmp_path)


def test_preprocess_expands_a_quoted_pattern(tmp_path, monkeypatch):
    """--input 'shard_*.jsonl' (Megatron-LM's preprocess_data.py expands it): the files it
    matches, in order; one matching nothing says so."""
    monkeypatch.chdir(tmp_path)
    for i in (2, 1, 10):
        Path(f"shard_{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    dataset = data.open_indexed_dataset(data.preprocess(["shard_*.jsonl"], "out"))
    assert [TOKENIZER.detokenize(dataset[i]) for i in range(len(dataset))] == [
        "doc 1", "doc 10", "doc 2"]
    with pytest.raises(FileNotFoundError, match=r"input file shard_\?\.txt does not exist or is "
                                                r"not a file \(a pattern that matches no file\)"):
        data.preprocess(["shard_?.txt"], "none")
    with pytest.raises(ValueError, match=r"shard_1\.jsonl is given twice"):
        data.preprocess(["shard_1.jsonl", "shard_[12].jsonl"], "twice")


def test_preprocess_without_text_names_the_files(tmp_path):
    """Blank lines and empty texts are skipped; inputs left with none are named plainly."""
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n\n')
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError) as err:
        data.preprocess([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "out")
    assert str(err.value) == (
        f'no text found in {tmp_path}/a.jsonl, {tmp_path}/b.txt: the files are empty or blank, '
        'or every JSON-lines record\'s "text" is empty; nothing was written')
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.txt"]


def test_preprocess_refuses_a_file_given_twice(tmp_path, monkeypatch):
    """Twice the same name, or a name and another path to the same file (a glob beside it, a
    link): its documents would be in the dataset twice."""
    monkeypatch.chdir(tmp_path)
    source = write_paragraphs(tmp_path / "a.txt", ["only once"])
    (tmp_path / "link.txt").symlink_to(source)
    other = write_paragraphs(tmp_path / "b.txt", ["another file"])
    for inputs, message in [([source, other, source], f"input file {source} is given twice, "),
                            ([source, "./link.txt"], f"./link.txt is given twice (also as {source})")]:
        with pytest.raises(ValueError, match=re.escape(message) + ".*pass each file once"):
            data.preprocess(inputs, tmp_path / "out", min_document_chars=1)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "link.txt"]  # nothing written
    copy = tmp_path / "copy" / "a.txt"  # the same text in another file is another file
    copy.parent.mkdir()
    shutil.copy(source, copy)
    assert len(data.open_indexed_dataset(data.preprocess(
        [source, str(copy)], tmp_path / "out", min_document_chars=1))) == 2


@pytest.mark.parametrize("lines, message", [
    (['{"text": "fine"}', '{"body": "no text here"}'],
     'bad.jsonl, line 2: no "text" field (found an object without it); each line must be one '
     'JSON object with a "text" string'),
    (['{"text": "fine"}', "", '["text", "a list"]'],
     'bad.jsonl, line 3: no "text" field (found list)'),
    (['{"text": 42}'], 'bad.jsonl, line 1: "text" is 42, not a string'),
    (['{"text": null}'], 'bad.jsonl, line 1: "text" is null, not a string'),
    (['{"text": "fine"}', '{"text": "cut off'],
     "bad.jsonl, line 2: not valid JSON (Unterminated string starting at column 10); each "
     "line must be one JSON object"),
    (['{"text": "fine"}', '{"text": "cut \\ud83d"}'],
     'bad.jsonl, line 2: "text" holds the unpaired UTF-16 surrogate "\\ud83d" at character 4'),
    (['{"text": "fine"}', '{"text": "a\0b"}'],
     "bad.jsonl holds NUL bytes (first on line 2): it looks like a binary file, not text"),
])
def test_preprocess_names_the_bad_jsonl_line(tmp_path, lines, message):
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        data.preprocess([source], tmp_path / "out")
    assert message in str(err.value)
    assert str(source) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written


def test_preprocess_refuses_a_file_with_nul_bytes(tmp_path):
    source = tmp_path / "image.txt"
    source.write_bytes(b"a header line\nthen\0\0\0 binary\n")
    with pytest.raises(ValueError, match=r"image\.txt holds NUL bytes \(first on line 2\): it "
                                         r"looks like a binary file, not text; pass UTF-8 text"):
        data.preprocess([source], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["image.txt"]


def test_preprocess_needs_force_to_replace_a_dataset(tmp_path):
    prefix = make_prefix(tmp_path, "ds", ["first version"])
    saved = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}
    source = write_paragraphs(tmp_path / "v2.txt", ["second version"])
    with pytest.raises(FileExistsError) as err:
        data.preprocess([source], prefix, min_document_chars=1)
    assert str(err.value) == (f"output {prefix}.bin already exists; pass --force to replace it, "
                              "or choose another --output-prefix")
    assert {ext: Path(prefix + ext).read_bytes() for ext in saved} == saved  # untouched
    os.remove(prefix + ".bin")  # half a dataset is refused too
    with pytest.raises(FileExistsError, match=r"ds\.idx already exists"):
        data.preprocess([source], prefix, min_document_chars=1)
    data.preprocess([source], prefix, min_document_chars=1, force=True)
    dataset = data.open_indexed_dataset(prefix)  # keep it: its arrays are views of its mmap
    assert dataset[0].tolist() == TOKENIZER.tokenize("second version") + [TOKENIZER.eod]


@pytest.mark.parametrize("prefix", ["out/", ""])
def test_preprocess_output_prefix_must_name_a_dataset(tmp_path, monkeypatch, prefix):
    """A directory as --output-prefix would write the hidden files out/.bin and out/.idx."""
    monkeypatch.chdir(tmp_path)
    source = write_paragraphs(tmp_path / "in.txt", ["one"])
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="names a directory; add the dataset's name, e.g. "
                                         + os.path.join(prefix, "my_corpus")):
        data.preprocess([source], prefix)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out"] and not os.listdir("out")


def test_preprocess_input_directory_is_refused_with_a_pattern_of_its_files(tmp_path):
    shards = tmp_path / "my shards"
    shards.mkdir()
    (shards / "0.jsonl").write_text('{"text": "one"}\n')
    with pytest.raises(ValueError) as err:
        data.preprocess([shards], tmp_path / "out")
    pattern = shlex.split(re.search(r"--input (.*) \(a quoted", str(err.value)).group(1))
    assert len(data.open_indexed_dataset(data.preprocess(pattern, tmp_path / "out"))) == 1


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_preprocess_output_prefix_with_the_extension_is_refused(tmp_path, suffix):
    """--output-prefix out/a.bin would write out/a.bin.bin, which data_path=[out/a] misses."""
    source = write_paragraphs(tmp_path / "in.txt", ["one"])
    with pytest.raises(ValueError) as err:
        data.preprocess([source], tmp_path / f"a{suffix}")
    assert str(err.value) == (f"--output-prefix {tmp_path}/a{suffix} ends in {suffix}; give the "
                              f"prefix without it, {tmp_path}/a (writes its .bin and .idx)")
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_preprocess_output_prefix_under_a_file_names_it(tmp_path):
    """--output-prefix in.txt/x: os.makedirs says only "File exists" of the file in the way."""
    source = write_paragraphs(tmp_path / "in.txt", ["one"])
    with pytest.raises(ValueError) as err:
        data.preprocess([source], tmp_path / "in.txt" / "x")
    assert str(err.value) == (
        f"--output-prefix {tmp_path}/in.txt/x: cannot create the directory {tmp_path}/in.txt: "
        f"File exists (a part of the path is a file) ({tmp_path}/in.txt)")


def test_preprocess_a_failed_write_is_one_line_naming_the_output(tmp_path, monkeypatch):
    """A read-only directory or a full disk: the prefix, why, and the free space; no temp file
    is left and an earlier dataset stays."""
    prefix = make_prefix(tmp_path, "ds", ["first version"])
    saved = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}
    source = write_paragraphs(tmp_path / "v2.txt", ["second version"])

    def full_disk(self, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data.IndexedDatasetBuilder, "add_item", full_disk)
    with pytest.raises(ValueError) as err:
        data.preprocess([source], prefix, min_document_chars=1, force=True)
    assert re.fullmatch(rf"--output-prefix {prefix}: cannot write the dataset: No space left on "
                        r"device; .* free .*", str(err.value)), str(err.value)
    assert {ext: Path(prefix + ext).read_bytes() for ext in saved} == saved
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.txt", "v2.txt"]

    def read_only(self, path, dtype):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(data.IndexedDatasetBuilder, "__init__", read_only)
    with pytest.raises(ValueError, match=rf"^--output-prefix {tmp_path}/new: cannot write the "
                                         r"dataset: Read-only file system \(.*/new\.bin\.tmp"):
        data.preprocess([source], tmp_path / "new", min_document_chars=1)

    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.undo()
    monkeypatch.setattr(data, "open", unreadable, raising=False)  # root reads any file
    with pytest.raises(ValueError, match=rf"^input file {source}: cannot read it: Permission "
                                         rf"denied \({source}\)$"):
        data.preprocess([source], tmp_path / "new", min_document_chars=1)


def test_preprocess_min_document_chars_must_be_positive(tmp_path):
    source = write_paragraphs(tmp_path / "in.txt", ["one"])
    with pytest.raises(ValueError, match=r"--min-document-chars must be >= 1 \(got 0\)"):
        data.preprocess([source], tmp_path / "out", min_document_chars=0)


def test_preprocess_command_line_errors_have_no_traceback(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "one"}\n{"txt": "two"}\n')
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dsmoe_megatron.data", "--input", str(source),
               "--output-prefix", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 1
    assert f'dsmoe-preprocess: error: {source}, line 2: no "text" field' in run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_cli(tmp_path, capsys):
    source = write_paragraphs(tmp_path / "in.txt", ["one", "two"])
    argv = ["--input", source, "--output-prefix", str(tmp_path / "cli"),
            "--min-document-chars", "1"]
    assert data.main(argv) == 0
    assert "2 documents, 8 tokens" in capsys.readouterr().out  # "one"+eod, "two"+eod
    assert data.main(["--input", str(tmp_path / "absent.txt"), "--output-prefix", "x"]) == 1
    assert "absent.txt" in capsys.readouterr().err
    assert data.main(argv) == 1
    assert "cli.bin already exists; pass --force" in capsys.readouterr().err
    assert data.main([*argv, "--force"]) == 0


def test_cli_json_key_names_the_text_field(tmp_path, capsys):
    """Many corpora keep their text under another name (The Stack: "content")."""
    texts = ["first 🙂", "second\r\nline"]
    source = tmp_path / "code.jsonl"
    source.write_text("".join(json.dumps({"id": i, "content": t}) + "\n"
                              for i, t in enumerate(texts)))
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "code")]
    assert data.main(argv) == 1
    assert ('code.jsonl, line 1: no "text" field (found an object without it); each line must '
            'be one JSON object with a "text" string, e.g. {"text": "..."}, or name its text '
            'field with --json-key ("content")') in capsys.readouterr().err
    assert data.main([*argv, "--json-key", "content"]) == 0
    dataset = data.open_indexed_dataset(str(tmp_path / "code"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        list(t.encode()) + [TOKENIZER.eod] for t in texts]


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_entry_point(tmp_path, monkeypatch):
    source = write_paragraphs(tmp_path / "in.txt", ["hello"])
    argv = ["dsmoe_megatron.data", "--input", source, "--output-prefix", str(tmp_path / "m")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # what `python -m dsmoe_megatron.data` runs
        runpy.run_module("dsmoe_megatron.data", run_name="__main__")
    assert exit_info.value.code == 0
    assert os.path.exists(tmp_path / "m.idx") and os.path.exists(tmp_path / "m.bin")


def test_default_corpus_is_cached(tmp_path):
    prefix = data.default_corpus_prefix(tmp_path)
    mtime = os.path.getmtime(prefix + ".bin")
    assert data.default_corpus_prefix(tmp_path) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime
    dataset = data.open_indexed_dataset(prefix)
    assert dataset.sequence_lengths.sum() > 100_000


def test_a_damaged_corpus_cache_is_rebuilt(tmp_path):
    """The package's own cache of the shipped corpus, truncated (a full disk, a killed copy) or
    garbled, is built again, not reported as the user's to fix with dsmoe-preprocess."""
    prefix = data.default_corpus_prefix(tmp_path)

    def digests():
        return {ext: hashlib.sha256(Path(prefix + ext).read_bytes()).hexdigest()
                for ext in (".bin", ".idx")}

    built = digests()
    for ext, damaged in ((".bin", Path(prefix + ".bin").read_bytes()[:1000]),
                         (".idx", b"not an index")):
        Path(prefix + ext).write_bytes(damaged)
        assert data.default_corpus_prefix(tmp_path) == prefix
        assert digests() == built, ext


# --- GPT datasets ----------------------------------------------------------------------------


def test_gpt_samples_come_from_corpus(corpus_prefix, tmp_path):
    seq_length = 64
    train, valid = data.build_gpt_datasets(
        [corpus_prefix], seq_length, seed=7, train_samples=50, valid_samples=5,
        cache_dir=tmp_path,
    )
    corpus = b"".join(open(p, "rb").read() for p in data.corpus_files())
    for dataset in (train, valid):
        assert len(dataset) >= 5
        for idx in range(5):
            sample = dataset[idx]
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.shape == labels.shape == (seq_length,)
            assert torch.equal(tokens[1:], labels[:-1])
            text = torch.cat([tokens, labels[-1:]]).tolist()  # seq_length + 1 tokens
            groups = itertools.groupby(text, key=TOKENIZER.eod.__eq__)
            pieces = [bytes(piece) for is_eod, piece in groups if not is_eod]
            assert all(piece in corpus for piece in pieces)
            assert sample["loss_mask"].sum() == seq_length
            assert torch.equal(sample["position_ids"], torch.arange(seq_length))


def test_ids_of_a_models_own_tokenizer_are_neither_zeroed_nor_masked(tmp_path):
    """Text tokenized with an imported model's tokenizer holds ids the byte tokenizer gives its
    special tokens (258, its pad, is a common word piece of a byte-level BPE). Megatron's
    dataset replaced every id equal to the tokenizer's pad by 0 and left it out of the loss;
    indexed documents hold no padding, so every token is trained on as written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    pad = ByteTokenizer().pad
    documents = [[300 + i % 7, pad, 256, 257, pad, pad, 301] for i in range(60)]
    prefix = str(tmp_path / "own_tokenizer")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(400))
    for document in documents:
        builder.add_item(torch.tensor(document))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    train, _ = data.build_gpt_datasets([prefix], 16, seed=0, split="100,0,0", cache_dir=tmp_path)
    written = {token for document in documents for token in document}
    for idx in range(len(train)):
        sample = train[idx]
        text = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
        assert set(text) <= written and pad in text, text
        assert sample["loss_mask"].sum() == 16


def test_split_sizes(tmp_path):
    prefix = make_prefix(tmp_path, "ten", numbered_paragraphs("d", 10))
    train, valid = data.build_gpt_datasets(
        [prefix], 32, seed=1, split="80,20,0", train_samples=40, valid_samples=4, cache_dir=tmp_path
    )
    assert train.indices.tolist() == list(range(8))
    assert valid.indices.tolist() == [8, 9]
    assert len(train) >= 40 and len(valid) >= 4

    train, valid = data.build_gpt_datasets(
        f"{prefix}", 32, seed=1, split="100,0,0", train_samples=10, cache_dir=tmp_path
    )
    assert valid is None and train.indices.tolist() == list(range(10))


def test_blending_two_prefixes(tmp_path):
    prefix_a = make_prefix(tmp_path, "a", ["A" * 200] * 20)
    prefix_b = make_prefix(tmp_path, "b", ["B" * 200] * 20)
    train, valid = data.build_gpt_datasets(
        ["0.7", prefix_a, "0.3", prefix_b], 16, seed=3, split="90,10,0",
        train_samples=200, valid_samples=20, cache_dir=tmp_path,
    )
    assert len(train) == 200 and len(valid) == 20
    counts = {0: 0, 1: 0}
    for idx in range(len(train)):
        sample = train[idx]
        source = int(sample["dataset_id"])
        counts[source] += 1
        letter = ord("A") if source == 0 else ord("B")
        assert set(sample["tokens"].tolist()) <= {letter, TOKENIZER.eod}
    assert counts == {0: 140, 1: 60}


def test_missing_and_corrupt_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.idx.*dsmoe-preprocess"):
        data.build_gpt_datasets([str(tmp_path / "absent")], 16, seed=0)
    with pytest.raises(FileNotFoundError, match="without the extension"):
        data.build_gpt_datasets([str(tmp_path / "absent.bin")], 16, seed=0)

    prefix = make_prefix(tmp_path, "ok", numbered_paragraphs("x", 5))
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"ok\.bin.*dsmoe-preprocess"):
        data.open_indexed_dataset(prefix)

    prefix = make_prefix(tmp_path, "garbage", numbered_paragraphs("x", 5))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"not an index at all")
    with pytest.raises(ValueError, match=r"garbage\.idx.*corrupt.*dsmoe-preprocess"):
        data.build_gpt_datasets([prefix], 16, seed=0)

    prefix = make_prefix(tmp_path, "truncated", numbered_paragraphs("x", 5))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"truncated\.bin.*corrupt.*dsmoe-preprocess"):
        data.build_gpt_datasets([prefix], 16, seed=0)


def test_data_path_naming_a_directory_asks_for_a_prefix_in_it(tmp_path):
    """The advice was to preprocess into the directory's name, which dsmoe-preprocess refuses
    (or makes a hidden data/.bin for data/)."""
    for given in (str(tmp_path), f"{tmp_path}/"):
        with pytest.raises(FileNotFoundError, match=r"is a directory; data_path takes a "
                                                    r"dataset's prefix.*extension$"):
            data.open_indexed_dataset(given)
    make_prefix(tmp_path, "b", numbered_paragraphs("x", 5))
    make_prefix(tmp_path, "a", numbered_paragraphs("x", 5))
    with pytest.raises(FileNotFoundError) as err:
        data.open_indexed_dataset(f"{tmp_path}/")
    assert str(err.value).endswith(f"e.g. {tmp_path / 'a'} (of a.idx, b.idx there)")


@pytest.mark.parametrize("name", ["my corpus.txt", "shard.jsonl.gz"])
def test_data_path_naming_the_text_file_gives_the_command_that_makes_its_dataset(tmp_path,
                                                                               name):
    """The command in the error, pasted into a shell, makes the dataset it then names."""
    text = tmp_path / name
    with (gzip.open if name.endswith(".gz") else open)(text, "wt") as f:
        f.write(json.dumps({"text": "some text"}) + "\n" if ".jsonl" in name else "some text\n")
    with pytest.raises(FileNotFoundError) as err:
        data.open_indexed_dataset(str(text))
    message = str(err.value)
    command = re.search(r"tokenize it with: (dsmoe-preprocess .*), then set data_path to (.*)$",
                        message)
    assert command, message
    argv = shlex.split(command.group(1))
    assert data.main(argv[1:]) == 0
    assert len(data.open_indexed_dataset(command.group(2))) == 1
    assert command.group(2) == str(tmp_path / name.split(".")[0])
    # Once made, the error names the dataset beside the text file.
    with pytest.raises(FileNotFoundError, match=r"is a text file, not a dataset; set data_path "
                                                f"to {re.escape(command.group(2))}$"):
        data.open_indexed_dataset(str(text))


@pytest.mark.parametrize("damage", ["no .idx", "truncated .bin"])
def test_the_command_to_recreate_a_damaged_dataset_replaces_it(tmp_path, damage):
    """Without --force, dsmoe-preprocess would refuse the file of the pair that is left."""
    prefix = make_prefix(tmp_path, "corpus", numbered_paragraphs("x", 5))
    if damage == "no .idx":
        os.remove(prefix + ".idx")
    else:
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(100)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        data.open_indexed_dataset(prefix)
    command = re.search(r"create it with: (dsmoe-preprocess .*)$", str(err.value))
    assert command, str(err.value)
    argv = shlex.split(command.group(1).replace("TEXT_FILE [...]", str(tmp_path / "corpus.txt")))
    assert data.main(argv[1:]) == 0
    data.open_indexed_dataset(prefix)  # whole again


def test_a_damaged_dataset_named_with_its_extension_is_recreated_under_the_prefix(tmp_path):
    """data_path=[corpus.bin], a pair corpus.bin.bin / .idx (as dsmoe-preprocess --output-prefix
    corpus.bin wrote it) with its .idx gone: the command given, --output-prefix corpus.bin
    --force, is one dsmoe-preprocess refuses."""
    prefix = make_prefix(tmp_path, "corpus", numbered_paragraphs("x", 5))
    os.rename(prefix + ".bin", prefix + ".bin.bin")
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError) as err:
        data.open_indexed_dataset(prefix + ".bin")
    command = re.search(r"create it with: (dsmoe-preprocess .*)$", str(err.value))
    assert command, str(err.value)
    argv = shlex.split(command.group(1).replace("TEXT_FILE [...]", str(tmp_path / "corpus.txt")))
    assert data.main(argv[1:]) == 0
    assert f"data_path takes the prefix without the extension: {prefix};" in str(err.value)
    data.open_indexed_dataset(prefix)


def test_corpus_too_small_for_seq_length(tmp_path):
    prefix = make_prefix(tmp_path, "tiny", ["just a few words"] * 10)
    with pytest.raises(ValueError, match=r"too small for seq_length=512.*train split"):
        data.build_gpt_datasets([prefix], 512, seed=0)
    # 2% of 10 documents rounds to none for validation: Megatron would loop forever on it.
    with pytest.raises(ValueError, match=r"valid split no document: split='98,2,0' shares out "
                                         r"whole documents and it holds 10 \(170 tokens\)"):
        data.build_gpt_datasets([prefix], 8, seed=0)


def test_a_split_without_documents_is_not_called_too_little_text(tmp_path):
    """Plenty of text in one document (a .txt without blank lines): the split, not the amount
    of text, leaves validation nothing, and the error says so."""
    source = tmp_path / "novel.txt"
    source.write_text("".join(f"line {i} of a novel with no blank lines\n" for i in range(500)))
    prefix = data.preprocess([source], tmp_path / "novel")
    with pytest.raises(ValueError) as err:
        data.build_gpt_datasets([prefix], 16, seed=0, split="95,5,0", cache_dir=tmp_path)
    tokens = len(source.read_bytes().rstrip(b"\n")) + 1  # the paragraph and its EOD
    assert (f"gives its valid split no document: split='95,5,0' shares out whole documents and "
            f"it holds 1 ({tokens} tokens)") in str(err.value)
    assert "too small" not in str(err.value)


def test_datasets_are_one_pass_whatever_the_run_length(tmp_path):
    """Without sample counts a split is one pass over its data: one epoch, and for a weighted
    blend as many samples as its datasets' splits hold together (hand count: 10 documents of
    200 bytes + EOD, 8 in train, seq_length 16 -> (8 * 201 - 1) // 16 = 100 per dataset)."""
    prefix_a = make_prefix(tmp_path, "a", ["A" * 200] * 10)
    prefix_b = make_prefix(tmp_path, "b", ["B" * 200] * 10)
    train, valid = data.build_gpt_datasets(["0.5", prefix_a, "0.5", prefix_b], 16, seed=0,
                                           split="80,20,0", cache_dir=tmp_path)
    assert len(train) == 2 * 100 and len(valid) == 2 * ((2 * 201 - 1) // 16)
    single, _ = data.build_gpt_datasets([prefix_a], 16, seed=0, split="80,20,0",
                                        cache_dir=tmp_path)
    assert len(single) == 100


def test_a_test_share_too_small_is_not_checked(tmp_path):
    """Only the train and valid splits are built: a test share holding no sample is fine."""
    prefix = make_prefix(tmp_path, "t", ["T" * 200] * 100)
    train, valid = data.build_gpt_datasets([prefix], 16, seed=0, split="969,30,1",
                                           cache_dir=tmp_path)
    assert len(train) > 0 and len(valid) > 0


def test_a_dataset_rebuilt_at_the_same_prefix_gets_fresh_sample_indices(tmp_path):
    """Megatron's cached indices are named by path: a dataset rebuilt in place (here with fewer
    documents) must not be read through the old dataset's sample and shuffle indices."""
    cache = tmp_path / "cache"
    prefix = make_prefix(tmp_path, "p", numbered_paragraphs("old", 40))
    old, _ = data.build_gpt_datasets([prefix], 16, seed=0, split="100,0,0", cache_dir=cache)
    source = write_paragraphs(tmp_path / "new.txt", numbered_paragraphs("new", 6))
    data.preprocess([source], prefix, min_document_chars=1, force=True)

    rebuilt, _ = data.build_gpt_datasets([prefix], 16, seed=0, split="100,0,0", cache_dir=cache)
    fresh, _ = data.build_gpt_datasets([prefix], 16, seed=0, split="100,0,0",
                                       cache_dir=tmp_path / "fresh")
    assert len(old) > len(fresh) == len(rebuilt)
    text = open(source, "rb").read()
    for idx in range(len(fresh)):
        assert torch.equal(rebuilt[idx]["tokens"], fresh[idx]["tokens"])
        tokens = rebuilt[idx]["tokens"].tolist()
        assert all(bytes(piece) in text for is_eod, piece in
                   itertools.groupby(tokens, key=TOKENIZER.eod.__eq__) if not is_eod)


def test_without_validation_the_valid_split_is_neither_checked_nor_built(tmp_path):
    """The valid share still leaves training (the train split is the same), but need not hold
    a sample: 10% of 3 documents rounds to none."""
    prefix = make_prefix(tmp_path, "three", numbered_paragraphs("v", 3))
    with pytest.raises(ValueError, match="valid split no document"):
        data.build_gpt_datasets([prefix], 16, seed=0, split="90,10,0", cache_dir=tmp_path)
    train, valid = data.build_gpt_datasets([prefix], 16, seed=0, split="90,10,0",
                                           cache_dir=tmp_path, valid=False)
    assert valid is None and train.indices.tolist() == [0, 1, 2]

    prefix = make_prefix(tmp_path, "ten", numbered_paragraphs("v", 10))
    with_valid, _ = data.build_gpt_datasets([prefix], 16, seed=0, split="80,20,0",
                                            cache_dir=tmp_path)
    train, valid = data.build_gpt_datasets([prefix], 16, seed=0, split="80,20,0",
                                           cache_dir=tmp_path, valid=False)
    assert valid is None and train.indices.tolist() == list(range(8))
    assert len(train) == len(with_valid)
    for idx in range(len(train)):
        assert torch.equal(train[idx]["tokens"], with_valid[idx]["tokens"])


def test_index_cache_avoids_a_read_only_dataset_directory(tmp_path, monkeypatch):
    prefix = make_prefix(tmp_path, "ro", numbered_paragraphs("r", 20))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "_can_create", lambda directory: False)
    data.build_gpt_datasets([prefix], 16, seed=0, split="80,20,0")
    assert not (tmp_path / "gpt_index_cache").exists()
    assert list((tmp_path / "home" / ".cache" / "dsmoe_megatron" / "gpt_index_cache").iterdir())


# --- batches ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train_set(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("batches")
    prefix = make_prefix(tmp_path, "s", numbered_paragraphs("s", 12))
    train, _ = data.build_gpt_datasets(
        [prefix], 16, seed=5, split="100,0,0", train_samples=30, cache_dir=tmp_path
    )
    return train


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a["attention_mask"] is None and b["attention_mask"] is None
        for key in data.BATCH_KEYS:
            assert torch.equal(a[key], b[key]), key


def test_batches_are_deterministic_and_resumable(small_train_set):
    micro_batch_size = 4
    num_batches = 3 * len(small_train_set) // micro_batch_size  # crosses epoch boundaries
    reference = take(data.iterate_batches(small_train_set, micro_batch_size, seed=11), num_batches)
    assert reference[0]["tokens"].shape == (micro_batch_size, 16)
    assert reference[0]["loss_mask"].dtype == torch.float32
    again = data.iterate_batches(small_train_set, micro_batch_size, seed=11)
    assert_same_batches(reference, take(again, num_batches))
    other_seed = take(data.iterate_batches(small_train_set, micro_batch_size, seed=12), 3)
    assert any(not torch.equal(a["tokens"], b["tokens"]) for a, b in zip(reference, other_seed))

    for stopped_after in (1, 9, num_batches - 2):
        resumed = data.iterate_batches(
            small_train_set, micro_batch_size, seed=11,
            consumed_samples=stopped_after * micro_batch_size,
        )
        assert_same_batches(reference[stopped_after:], take(resumed, num_batches - stopped_after))


def test_batches_split_across_data_parallel_ranks(small_train_set):
    single = take(data.iterate_batches(small_train_set, 4, seed=2), 4)
    ranks = [
        take(data.iterate_batches(small_train_set, 2, seed=2, data_parallel_rank=r,
                                  data_parallel_size=2), 4)
        for r in range(2)
    ]
    for step in range(4):
        joined = torch.cat([ranks[0][step]["tokens"], ranks[1][step]["tokens"]])
        assert torch.equal(joined, single[step]["tokens"])


STALLED_PREPROCESS = """
import sys, time
from dsmoe_megatron import data

def stalled(path, *options):
    yield "one document, then a wait"
    time.sleep(600)

data._read_documents = stalled
data.preprocess([sys.argv[1]], sys.argv[2])
"""


def test_preprocess_removes_what_a_killed_run_left_and_nothing_of_a_live_one(tmp_path):
    """A run killed with -9 leaves PREFIX.bin.tmp<its pid>; the next run for the prefix removes
    it, but not the file a live run is writing, nor one from another host (a shared disk)."""
    source = write_paragraphs(tmp_path / "in.txt", ["text"])
    prefix = str(tmp_path / "ds")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed, live = (subprocess.Popen([sys.executable, "-c", STALLED_PREPROCESS, source, prefix],
                                     env=env) for _ in range(2))
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("ds.bin.tmp*"))) < 2:
            assert killed.poll() is None and live.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        killed.kill()
        killed.wait()
        (left,) = tmp_path.glob(f"ds.bin.tmp{killed.pid}@*")
        elsewhere = tmp_path / f"ds.bin.tmp{killed.pid}@another-host"
        shutil.copy(left, elsewhere)
        writing = {p.name for p in tmp_path.glob(f"ds.bin.tmp{live.pid}@*")}
        data.preprocess([source], prefix, min_document_chars=1)
        assert {p.name for p in tmp_path.glob("ds.*")} == {
            "ds.bin", "ds.idx", elsewhere.name, *writing}
        assert live.poll() is None and len(writing) == 1
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()


def _word_level_tokenizer(directory, eos: str | None = "</s>"):
    """A word-level Hugging Face tokenizer (no byte ids in common with ByteTokenizer), saved as
    transformers saves one; returns the `tokenizers` object as the reference encoder."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {word: i + 7 for i, word in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, unk_token="<unk>",
                                                **({"eos_token": eos} if eos else {}))
    fast.save_pretrained(directory)
    return hf


@pytest.mark.parametrize("kind", ["word_level", "byte_level_export", "hf_source"])
def test_preprocess_with_a_hugging_face_tokenizer_writes_its_ids(tmp_path, capsys, kind):
    """A model imported with its own tokenizer trains on text in that tokenizer's ids:
    --tokenizer DIR writes encode(text, add_special_tokens=False) + its eos id per document,
    compared with the `tokenizers` library's own encoding and with ByteTokenizer. In from-hf's
    SAVE/hf_source the tokenizer lies beside the model's config.json, whose remote code is not
    there: transformers must not stop to ask whether to run it."""
    documents = ["the cat sat on the mat .", "a dog ran .", "the zebra sat ."]  # zebra: unknown
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    if kind == "word_level":
        hf = _word_level_tokenizer(tmp_path / "tok")
        expected = [hf.encode(t, add_special_tokens=False).ids + [hf.token_to_id("</s>")]
                    for t in documents]
        assert expected[2][1] == hf.token_to_id("<unk>") != 0
    else:
        pytest.importorskip("transformers")
        write_hf_tokenizer(tmp_path / "tok")
        expected = [TOKENIZER.tokenize(t) + [TOKENIZER.eod] for t in documents]
        if kind == "hf_source":
            (tmp_path / "tok" / "config.json").write_text(json.dumps({
                "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"],
                "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}}))
    code = data.main(["--tokenizer", str(tmp_path / "tok"), "--input", str(source),
                      "--output-prefix", str(tmp_path / "ds")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Do you wish to run the custom code" not in out, out
    dataset = data.open_indexed_dataset(str(tmp_path / "ds"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected


def test_preprocess_tokenizer_problems_are_one_line_and_write_nothing(tmp_path, capsys):
    source = write_paragraphs(tmp_path / "in.txt", ["the cat"])
    (tmp_path / "empty").mkdir()
    assert data.main(["--tokenizer", str(tmp_path / "empty"), "--input", source,
                      "--output-prefix", str(tmp_path / "ds")]) == 1
    assert capsys.readouterr().err == (
        f"dsmoe-preprocess: error: --tokenizer {tmp_path}/empty holds no Hugging Face tokenizer "
        "(tokenizer.json, tokenizer_config.json or tokenizer.model); pass the directory of the "
        "model's tokenizer files (from-hf keeps them in SAVE/hf_source)\n")

    _word_level_tokenizer(tmp_path / "no_eos", eos=None)
    argv = ["--tokenizer", str(tmp_path / "no_eos"), "--input", source,
            "--output-prefix", str(tmp_path / "ds")]
    assert data.main(argv) == 1
    err = capsys.readouterr().err
    assert "has no end-of-document (eos) token" in err and "add --no-append-eod" in err, err
    assert not (tmp_path / "ds.bin").exists()
    assert data.main([*argv, "--no-append-eod"]) == 0

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"model": ')
    assert data.main(["--tokenizer", str(tmp_path / "broken"), "--input", source,
                      "--output-prefix", str(tmp_path / "ds2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dsmoe-preprocess: error: --tokenizer {tmp_path}/broken: transformers "
                          "cannot load its tokenizer (") and err.count("\n") == 1, err
    assert not (tmp_path / "ds2.bin").exists()
