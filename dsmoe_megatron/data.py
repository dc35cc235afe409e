"""Offline data pipeline: raw text -> Megatron indexed dataset (.bin/.idx) -> GPTDataset batches.

Command line (also ``python -m dsmoe_megatron.data``)::

    dsmoe-preprocess --input a.txt b.jsonl --output-prefix data/my_corpus

then train with ``data_path=["data/my_corpus"]`` or a blend such as
``["0.7", "data/a", "0.3", "data/b"]``.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import contextlib
import functools
import glob
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path

from dsmoe_megatron.cli import describe_os_error, quiet_warnings, quiet_when_run_as_main

quiet_when_run_as_main(__name__)

import numpy  # noqa: E402
import torch  # noqa: E402

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: E402
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    _IndexReader,
    get_bin_path,
    get_idx_path,
)
from megatron.core.datasets.utils import Split, get_blend_from_list  # noqa: E402

from dsmoe_megatron.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# Paragraphs are merged up to this size so that a training sequence mostly sees coherent text.
DEFAULT_MIN_DOCUMENT_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# Raw text -> documents -> .bin/.idx


JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Corpora are often shipped compressed (C4's .json.gz); these decompress on the fly.
COMPRESSED_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
UNREAD_COMPRESSIONS = (".zst", ".zstd", ".lz4", ".zip", ".7z", ".tar", ".tgz", ".br", ".snappy")


def _read_documents(path: str, min_document_chars: int, json_key: str = "text"
                    ) -> Iterator[str]:
    """.jsonl / .json (Megatron-LM's name for JSON lines) / .ndjson, any case: one document per
    line's ``json_key``; other files: blank-line paragraphs, merged (refused when their first
    line is a JSON object: JSON lines under another name would be trained on as raw JSON). A
    UTF-8 byte-order mark is dropped. A .gz / .bz2 / .xz suffix after these is decompressed."""
    name, compression = os.path.splitext(path.lower())
    opener = COMPRESSED_OPENERS.get(compression)
    if opener is None:
        name, opener = path.lower(), open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            if name.endswith(JSON_LINES_SUFFIXES):
                for number, line in enumerate(f, 1):
                    text = _jsonl_text(path, number, line, json_key)
                    if text:
                        yield text
                return
            # Blank lines, then the first with text ("" at the end; a bounded look ahead).
            leading = [f.readline()]
            while leading[-1] and not leading[-1].strip() and len(leading) < 10_000:
                leading.append(f.readline())
            if _is_json_object(leading[-1]):
                raise ValueError(
                    f"input file {path} looks like JSON lines (its first non-blank line is a "
                    "JSON object) "
                    "but is read as plain text because of its name, which would train on the "
                    "JSON syntax; give it the suffix .jsonl (or .json / .ndjson, before any .gz "
                    "/ .bz2 / .xz) to take each record's text")
            lines = itertools.chain(leading, f)
            yield from _merge_paragraphs(_paragraphs(lines, path), min_document_chars)
    except UnicodeDecodeError as err:
        compressed = "" if opener is open else f" once decompressed as {compression}"
        other = os.path.splitext(name)[1] if opener is open else ""  # ".zst" of "a.jsonl.zst"
        fix = (f"{other} files are not read: decompress it, or compress it as .gz, .bz2 or "
               ".xz" if other in UNREAD_COMPRESSIONS
               else "convert it to UTF-8 (iconv -f ENCODING -t UTF-8) or drop that line")
        where = _first_non_utf8(path, opener) or err  # err's position is in a read buffer
        raise ValueError(f"input file {path} is not UTF-8 text{compressed} ({where}); {fix}"
                         ) from None
    except (OSError, EOFError, lzma.LZMAError) as err:  # a damaged or mislabelled archive
        if opener is open:
            raise ValueError(describe_os_error(f"input file {path}: cannot read it", err)
                             ) from None
        raise ValueError(f"input file {path} cannot be decompressed as {compression} "
                         f"({type(err).__name__}: {err}); is it complete and really "
                         f"{compression}-compressed?") from err


def _first_non_utf8(path: str, opener) -> str | None:
    """Where the first byte that is not UTF-8 is: its line and its byte in that line."""
    with contextlib.suppress(OSError, EOFError, lzma.LZMAError), opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"byte 0x{line[err.start]:02x} on line {number}, byte {err.start + 1}"
    return None


def _is_json_object(line: str) -> bool:
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _paragraphs(lines: Iterable[str], path: str) -> Iterator[str]:
    """The pieces of a text between blank lines, as ``re.split(r"\\n[ \\t]*\\n", text)`` gives
    them, read line by line: a file of any size in the memory of its longest paragraph. A
    break is a line's newline and the blank line after it (spaces and tabs only); a blank line
    whose preceding newline ended the last break starts the next piece."""
    piece: list[str] = []
    newline_free = False  # the previous line ended in a newline no break has taken
    for number, line in enumerate(lines, 1):
        if "\0" in line:
            raise _nul_error(path, number)
        if newline_free and not line.strip(" \t\n") and line.endswith("\n"):
            piece[-1] = piece[-1][:-1]
            yield "".join(piece)
            piece, newline_free = [], False
        else:
            piece.append(line)
            newline_free = line.endswith("\n")
    yield "".join(piece)


def _merge_paragraphs(paragraphs: Iterable[str], min_document_chars: int) -> Iterator[str]:
    """Consecutive non-blank paragraphs joined into documents of at least
    ``min_document_chars`` (the last one may be shorter)."""
    chunk: list[str] = []
    chunk_chars = 0
    for paragraph in paragraphs:
        if paragraph.strip():
            chunk.append(paragraph.strip("\n"))
            chunk_chars += len(chunk[-1])
        if chunk_chars >= min_document_chars:
            yield "\n\n".join(chunk)
            chunk, chunk_chars = [], 0
    if chunk:
        yield "\n\n".join(chunk)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_JSONL_FORMAT = 'each line must be one JSON object with a {key} string, e.g. {{{key}: "..."}}'


def _jsonl_text(path: str, number: int, line: str, json_key: str = "text") -> str:
    """The ``json_key`` of one JSON-lines line ("" for a blank line); ValueError naming the
    line."""
    if not line.strip():
        return ""
    if "\0" in line:
        raise _nul_error(path, number)
    where = f"{path}, line {number}"
    field = json.dumps(json_key)
    expected = _JSONL_FORMAT.format(key=field)
    try:
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        problem = err.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise ValueError(f"{where}: not valid JSON ({problem} at column {err.colno}); "
                         f"{expected}") from None
    if not isinstance(record, dict) or json_key not in record:
        found = "an object without it" if isinstance(record, dict) else type(record).__name__
        strings = [json.dumps(k) for k, v in record.items()
                   if isinstance(v, str)] if isinstance(record, dict) else []
        hint = (f", or name its text field with --json-key ({', '.join(strings[:8])})"
                if strings else "")
        raise ValueError(f"{where}: no {field} field (found {found}); {expected}{hint}")
    text = record[json_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {field} is {json.dumps(text)[:40]}, not a string; "
                         f"{expected}")
    # JSON can escape half of a UTF-16 pair ("\ud800"), which has no UTF-8 bytes to tokenize.
    if surrogate := _LONE_SURROGATE.search(text):
        raise ValueError(
            f"{where}: {field} holds the unpaired UTF-16 surrogate "
            f"{json.dumps(surrogate.group())} at character {surrogate.start()}, which is not "
            "text (a string cut inside an emoji or other pair?); fix or drop that record")
    return text


def _nul_error(path: str, line: int) -> ValueError:
    return ValueError(f"input file {path} holds NUL bytes (first on line {line}): it looks like a "
                     "binary file, not text; pass UTF-8 text (.txt) or JSON-lines (.jsonl) files")


def preprocess(
    input_paths: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: ByteTokenizer | HFTokenizer | None = None,
    append_eod: bool = True,
    min_document_chars: int = DEFAULT_MIN_DOCUMENT_CHARS,
    force: bool = False,
    json_key: str = "text",
) -> str:
    """Tokenize text files into ``<output_prefix>.bin/.idx`` and return the prefix.

    Files are written under temporary names and renamed at the end, so a reader never sees a
    half-written dataset. An existing dataset at ``output_prefix`` is replaced only with
    ``force``; without it, or when an input is bad, nothing at the prefix changes.
    """
    tokenizer = tokenizer or ByteTokenizer()
    input_paths = [match for p in input_paths for match in _expand_pattern(os.fspath(p))]
    output_prefix = os.fspath(output_prefix)
    if not input_paths:
        raise ValueError("preprocess needs at least one input file")
    if min_document_chars < 1:
        raise ValueError(f"--min-document-chars must be >= 1 (got {min_document_chars})")
    if append_eod and tokenizer.eod is None:
        raise ValueError(f"{tokenizer} has no end-of-document (eos) token to end each document "
                         "with; add --no-append-eod, or give it an eos_token")
    seen: dict[str, str] = {}  # real path -> as given
    for path in input_paths:
        if os.path.isdir(path):
            raise ValueError(
                f"input {path} is a directory; pass its files, e.g. --input "
                f"{shlex.quote(os.path.join(path, '*.jsonl'))} (a quoted pattern)")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"input file {path} does not exist or is not a file"
                + (" (a pattern that matches no file)" if glob.has_magic(path) else "")
                + "; pass existing UTF-8 text "
                '(.txt) or JSON-lines (.jsonl, one {"text": ...} object per line) files to --input'
            )
        real = os.path.realpath(path)
        if real in seen:  # a glob and a name, say
            also = f" (also as {seen[real]})" if seen[real] != path else ""
            raise ValueError(
                f"input file {path} is given twice{also}, which would put its documents in the "
                "dataset twice; pass each file once (to weight a dataset, give data_path blend "
                "weights)")
        seen[real] = path
    check_output_prefix(output_prefix, force)
    _remove_stale_temp_files(output_prefix)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(describe_os_error(
            f"--output-prefix {output_prefix}: cannot create the directory {out_dir}", err)
        ) from None
    suffix = f".tmp{os.getpid()}@{socket.gethostname()}"  # see _remove_stale_temp_files
    bin_tmp, idx_tmp = get_bin_path(output_prefix) + suffix, get_idx_path(output_prefix) + suffix
    builder = None
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        num_documents = 0
        for path in input_paths:
            for document in _read_documents(path, min_document_chars, json_key):
                ids = tokenizer.tokenize(document) + ([tokenizer.eod] if append_eod else [])
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                num_documents += 1
        builder.finalize(idx_tmp)
        if num_documents == 0:
            raise ValueError(
                f"no text found in {', '.join(input_paths)}: the files are empty or blank, or "
                f"every JSON-lines record's {json.dumps(json_key)} is empty; nothing was written")
        os.replace(bin_tmp, get_bin_path(output_prefix))
        # The .idx goes last: its presence marks a complete dataset.
        os.replace(idx_tmp, get_idx_path(output_prefix))
    except OSError as err:  # reading the inputs raises ValueError: this is the output
        raise ValueError(describe_os_error(
            f"--output-prefix {output_prefix}: cannot write the dataset", err, out_dir)) from None
    finally:
        if builder is not None:  # finalize() closes it too, but not on an error
            with contextlib.suppress(OSError):  # a full disk fails the flush again
                builder.data_file.close()
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    return output_prefix


def check_output_prefix(output_prefix: str, force: bool = False) -> None:
    """Refuse a prefix that names a directory or ends in .bin / .idx, and one of an existing
    dataset without ``force``."""
    if not os.path.basename(output_prefix):  # "data/" would write the hidden data/.bin
        raise ValueError(
            f"--output-prefix {output_prefix!r} names a directory; add the dataset's name, e.g. "
            f"{os.path.join(output_prefix, 'my_corpus')} (writes my_corpus.bin and .idx there)")
    if output_prefix.endswith((".bin", ".idx")):  # would write data/a.bin.bin
        raise ValueError(
            f"--output-prefix {output_prefix} ends in {output_prefix[-4:]}; give the prefix "
            f"without it, {output_prefix[:-4]} (writes its .bin and .idx)")
    for path in (get_bin_path(output_prefix), get_idx_path(output_prefix)):
        if os.path.exists(path) and not force:
            raise FileExistsError(
                f"output {path} already exists; pass --force to replace it, or choose another "
                "--output-prefix"
            )


def _expand_pattern(path: str) -> list[str]:
    """The files a quoted wildcard pattern (``'shard_*.jsonl'``, as Megatron-LM's
    preprocess_data.py takes) matches, sorted; a path that exists, or matches nothing, as is."""
    if os.path.exists(path) or not glob.has_magic(path):
        return [path]
    return sorted(glob.glob(path)) or [path]


def _remove_stale_temp_files(output_prefix: str) -> None:
    """Remove the temporary files that runs for ``output_prefix`` killed on this host left (the
    next run has another pid, so nothing else would). A live writer's, or another host's on a
    shared filesystem, are kept."""
    host = socket.gethostname()
    for path in (get_bin_path(output_prefix), get_idx_path(output_prefix)):
        for tmp in glob.glob(glob.escape(path) + ".tmp*"):
            pid, _, tmp_host = tmp[len(path) + len(".tmp"):].partition("@")
            # No host: named by an earlier version, which ran here as far as we can tell.
            if pid.isdigit() and tmp_host in (host, "") and not _process_alive(int(pid)):
                Path(tmp).unlink(missing_ok=True)  # another run may be cleaning up too


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def corpus_files() -> list[str]:
    """Paths of the public-domain .txt files shipped in ``dsmoe_megatron/corpus``."""
    corpus = resources.files("dsmoe_megatron") / "corpus"
    return sorted(str(p) for p in corpus.iterdir() if p.name.endswith(".txt"))


def default_corpus_prefix(
    cache_dir: str | os.PathLike | None = None, tokenizer: ByteTokenizer | None = None
) -> str:
    """Preprocess the shipped corpus into ``cache_dir`` once and return its prefix.

    The prefix name carries a hash of the corpus files and tokenizer, so an edited corpus or a
    different tokenizer gets a fresh dataset and an existing one is reused as is, unless it fails
    ``open_indexed_dataset``'s checks (a truncated .bin, say), when it is rebuilt.
    """
    tokenizer = tokenizer or ByteTokenizer()
    if cache_dir is None:
        cache_dir = os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsmoe_megatron"
        )
    digest = hashlib.sha256(json.dumps(tokenizer.unique_identifiers, sort_keys=True).encode())
    digest.update(str(DEFAULT_MIN_DOCUMENT_CHARS).encode())
    files = corpus_files()
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    prefix = os.path.join(os.fspath(cache_dir), f"dsmoe_corpus_{digest.hexdigest()[:16]}")
    try:
        open_indexed_dataset(prefix)
    except (FileNotFoundError, ValueError):  # missing, partial or damaged: our cache, rebuild it
        preprocess(files, prefix, tokenizer, force=True)
    return prefix


# ---------------------------------------------------------------------------------------------
# .bin/.idx -> GPTDataset


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open ``prefix.bin/.idx`` after checking that both exist and agree with each other."""
    fix = _preprocess_hint(prefix)
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"indexed dataset file {path} not found; {fix}")
    corrupt = (
        f"indexed dataset {get_idx_path(prefix)} / .bin is corrupt or not in Megatron's format"
    )
    try:
        # Read the index on its own first: a half-built IndexedDataset fails noisily in __del__.
        index = _IndexReader(get_idx_path(prefix), multimodal=False)
        num_sequences = len(index)
        expected_bin_bytes = (
            int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
            if num_sequences
            else 0
        )
        del index
    except Exception as err:
        raise ValueError(f"{corrupt} ({type(err).__name__}: {err}); re-{fix}") from err
    if num_sequences == 0:
        raise ValueError(f"indexed dataset {prefix} holds no documents; re-{fix}")
    bin_bytes = os.path.getsize(get_bin_path(prefix))
    if bin_bytes != expected_bin_bytes:
        raise ValueError(
            f"indexed dataset file {get_bin_path(prefix)} holds {bin_bytes} bytes but its .idx "
            f"describes {expected_bin_bytes}: the pair is corrupt or mismatched; re-{fix}"
        )
    try:
        return IndexedDataset(prefix)
    except Exception as err:
        raise ValueError(f"{corrupt} ({type(err).__name__}: {err}); re-{fix}") from err


def _preprocess_hint(prefix: str) -> str:
    """What makes ``prefix`` a dataset, as a command to paste: ``dsmoe-preprocess`` (with
    --force where a file of the pair is in its way), or for a prefix that names a text file
    or a .bin / .idx, the prefix to give instead."""
    if prefix.endswith((".bin", ".idx")):  # dsmoe-preprocess refuses such an --output-prefix
        stem = prefix[:-4]
        return (f"data_path takes the prefix without the extension: {stem}"
                + ("" if os.path.isfile(get_idx_path(stem)) else f"; {_preprocess_hint(stem)}"))
    present = any(map(os.path.exists, (get_bin_path(prefix), get_idx_path(prefix))))
    if not present:
        if os.path.isdir(prefix):  # data_path=[data/]: "preprocess into data/" cannot be done
            names = sorted(glob.glob(os.path.join(glob.escape(prefix), "*.idx")))[:4]
            return (f"{prefix} is a directory; data_path takes a dataset's prefix, the path of "
                    "its .bin / .idx without the extension"
                    + (f", e.g. {names[0][:-4]} (of {', '.join(map(os.path.basename, names[:3]))}"
                       f"{', ...' if len(names) > 3 else ''} there)" if names else ""))
        if os.path.isfile(prefix):  # data_path=[data/a.txt]
            name, compression = os.path.splitext(prefix)  # data/a.jsonl.gz -> data/a
            stem = os.path.splitext(name if compression.lower() in COMPRESSED_OPENERS
                                    else prefix)[0]
            make = ("" if os.path.isfile(get_idx_path(stem)) else
                    f"tokenize it with: dsmoe-preprocess --input {shlex.quote(prefix)} "
                    f"--output-prefix {shlex.quote(stem)}, then ")
            return f"{prefix} is a text file, not a dataset; {make}set data_path to {stem}"
    force = " --force" if present else ""
    return ("create it with: dsmoe-preprocess --input TEXT_FILE [...] --output-prefix "
            f"{shlex.quote(prefix)}{force}")


def _split_samples(prefix: str, dataset: IndexedDataset, split: str, seq_length: int,
                   valid: bool = True) -> dict[Split, int]:
    """The samples one pass over each split in use (train, and valid unless ``valid`` is
    false) holds.

    Megatron repeats a split's documents until it has enough tokens, and loops forever when
    the split has none, so each must hold at least one full sample. The test split is never
    built here, so its share is not checked."""
    lengths = dataset.sequence_lengths
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    samples = {}
    for part, bookends in zip(Split, split_matrix):
        if bookends is None or part == Split.test or (part == Split.valid and not valid):
            continue
        begin, end = (int(round(b * len(lengths))) for b in bookends)
        num_tokens = int(lengths[begin:end].sum())
        samples[part] = (num_tokens - 1) // seq_length
        if begin == end:  # the split cuts between documents: more text would not help
            raise ValueError(
                f"corpus {prefix} gives its {part.name} split no document: split={split!r} "
                f"shares out whole documents and it holds {len(lengths)} "
                f"({int(lengths.sum())} tokens); give that split a larger share, or preprocess "
                "the text into more documents (one JSON-lines record each, or blank lines "
                "between the paragraphs of a .txt file with a smaller --min-document-chars)"
            )
        if num_tokens < seq_length + 1:
            raise ValueError(
                f"corpus {prefix} is too small for seq_length={seq_length}: its {part.name} "
                f"split (split={split!r}, documents {begin}..{end} of {len(lengths)}) holds "
                f"{num_tokens} tokens, fewer than seq_length + 1 = {seq_length + 1}; use more "
                "text, a shorter seq_length, or a larger share for that split"
            )
    return samples


def _can_create(directory: str) -> bool:
    """Whether ``directory`` exists writable or can be made (the nearest existing parent is
    writable)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def _require_dataset_helpers() -> None:
    try:
        from megatron.core.datasets import helpers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "megatron-core's compiled dataset helpers (megatron/core/datasets/helpers_cpp) do not "
            "import. Binary megatron-core wheels ship them; for a source install, reinstall "
            "megatron-core with pybind11 and a C++ compiler available."
        ) from err


def check_blend(data_path: Sequence[str] | str, split: str, seq_length: int, valid: bool = True
                ) -> tuple[list[str], list[float] | None, collections.Counter]:
    """Open every dataset of a Megatron blend and check its splits, the valid one only if
    ``valid`` (errors name the file): (prefixes, weights or None, samples of one pass over
    each split of them together)."""
    blend = data_path.split() if isinstance(data_path, str) else [os.fspath(p) for p in data_path]
    if not blend:
        raise ValueError("data_path is empty; give at least one indexed dataset prefix")
    prefixes, weights = get_blend_from_list(blend)
    one_pass = collections.Counter()
    for prefix in prefixes:
        one_pass.update(_split_samples(prefix, open_indexed_dataset(prefix), split, seq_length,
                                       valid))
    return prefixes, weights, one_pass


def index_digests(prefixes: Sequence[str]) -> list[str]:
    """The sha256 of each dataset's .idx file, which fixes every document's length, and so
    the samples: a dataset rebuilt at the same prefix has another."""
    digests = []
    for prefix in prefixes:
        stat = os.stat(get_idx_path(prefix))
        digests.append(_file_sha256(get_idx_path(prefix), stat.st_ino, stat.st_size,
                                    stat.st_mtime_ns))
    return digests


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """Read once per version of the file (an .idx of a large corpus is gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def blend_index_digests(data_path: Sequence[str]) -> dict[str, str]:
    """{prefix: its .idx file's sha256} for the datasets of a Megatron blend."""
    prefixes, _ = get_blend_from_list([os.fspath(p) for p in data_path])
    return dict(zip(prefixes, index_digests(prefixes)))


def _index_digest(prefixes: Sequence[str]) -> str:
    """A digest of the datasets' .idx files.

    Megatron names its cached sample indices after the dataset's path, not its content: a
    dataset rebuilt at the same prefix (``dsmoe-preprocess --force``) would otherwise be read
    through the old one's indices, giving wrong samples or an IndexError."""
    digest = hashlib.sha256()
    for one in index_digests(prefixes):
        digest.update(bytes.fromhex(one))
    return f"idx_{digest.hexdigest()[:16]}"


class _DocumentTokenizer:
    """What Megatron's GPTDataset reads of a tokenizer, without its pad id, which the dataset
    zeroes in the inputs and masks in the loss. Indexed documents hold no padding, and data
    tokenized with an imported model's own tokenizer uses the byte tokenizer's pad id (258) for
    a word piece of its own."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self.eod = tokenizer.eod
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = tokenizer.unique_identifiers  # names the cached indices


def build_gpt_datasets(
    data_path: Sequence[str] | str,
    seq_length: int,
    seed: int,
    split: str = "98,2,0",
    train_samples: int | None = None,
    valid_samples: int | None = None,
    tokenizer: ByteTokenizer | None = None,
    cache_dir: str | os.PathLike | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    valid: bool = True,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """Build Megatron-core (train, valid) datasets from a Megatron blend.

    Each is a GPTDataset, or for several prefixes a BlendedDataset of them (its samples carry an
    extra ``dataset_id``).
    ``data_path`` is ``["prefix"]`` or ``["w1", "prefix1", "w2", "prefix2", ...]`` (a
    whitespace-separated string works too). Samples hold ``seq_length`` tokens plus the shifted
    labels, i.e. ``seq_length + 1`` tokens of text. ``*_samples=None`` means one pass over that
    split: one epoch, and for a weighted blend as many samples as its datasets' splits hold
    together. Sized so, a dataset does not depend on the run's length, and ``iterate_batches``
    gives the same sample stream when ``train_iters`` changes. Sample indices are cached in
    ``cache_dir`` (default: a ``gpt_index_cache`` folder next to the first prefix, or under
    ``~/.cache/dsmoe_megatron`` where that is read-only), in a folder named by the datasets'
    .idx files. A split with no share yields None, as does the valid split when ``valid`` is
    false (training without evaluation: its share is left out of training, but not checked).
    """
    tokenizer = tokenizer or ByteTokenizer()
    prefixes, weights, one_pass = check_blend(data_path, split, seq_length, valid)
    if weights is not None:  # Megatron blends only to a given size
        train_samples = train_samples or one_pass[Split.train]
        valid_samples = valid_samples or one_pass[Split.valid]
    _require_dataset_helpers()

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "gpt_index_cache")
        if not _can_create(cache_dir):
            cache_dir = os.path.join(Path.home(), ".cache", "dsmoe_megatron", "gpt_index_cache")
    cache_dir = os.path.join(cache_dir, _index_digest(prefixes))
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.fspath(cache_dir),
        tokenizer=_DocumentTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention builds its own mask
    )
    # The test split is never used: not building it keeps the train / valid boundaries and
    # spares Megatron a split it would loop on forever if its share holds no sample.
    train_bookends, valid_bookends = config.split_matrix[:2]
    config.split_matrix = [train_bookends, valid_bookends if valid else None, None]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], is_built_on_rank or (lambda: True), config
    ).build()
    return train_ds, valid_ds


# ---------------------------------------------------------------------------------------------
# Dataset -> batches


def iterate_batches(
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    seed: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[dict[str, torch.Tensor | None]]:
    """Yield micro batches forever, reshuffling the dataset each epoch.

    The global sample stream is fixed by ``seed``: position ``k`` is sample
    ``permutation(seed, k // len)[k % len]``. Each step consumes ``micro_batch_size *
    data_parallel_size`` samples of it and this rank takes its slice, so restarting with the
    ``consumed_samples`` of a checkpoint continues exactly where that run stopped.
    Batches hold ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ([micro_batch_size,
    seq_length]) and ``attention_mask=None`` (causal).
    """
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})"
        )
    epoch, order = -1, None
    step_start = consumed_samples
    while True:
        first = step_start + data_parallel_rank * micro_batch_size
        samples = []
        for position in range(first, first + micro_batch_size):
            if position // num_samples != epoch:
                epoch = position // num_samples
                order = numpy.random.default_rng([seed, epoch]).permutation(num_samples)
            samples.append(dataset[int(order[position % num_samples])])
        batch = {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
        batch["attention_mask"] = None
        yield batch
        step_start += micro_batch_size * data_parallel_size


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsmoe-preprocess",
        description="Tokenize text into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) "
        "with the byte-level tokenizer, or a model's Hugging Face tokenizer.",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE",
        help="UTF-8 .txt files (blank-line separated paragraphs) or .jsonl / .json / .ndjson "
        'files (one {"text": ...} per line), each optionally compressed (.gz, .bz2, .xz)',
    )
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX")
    parser.add_argument(
        "--json-key", default="text", metavar="KEY",
        help='the field of each JSON-lines record that holds its text (default: "text")',
    )
    parser.add_argument(
        "--no-append-eod", dest="append_eod", action="store_false",
        help="do not end each document with the end-of-document token",
    )
    parser.add_argument(
        "--min-document-chars", type=int, default=DEFAULT_MIN_DOCUMENT_CHARS,
        help="merge consecutive paragraphs of a .txt file into documents of at least this size",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR",
        help="a Hugging Face tokenizer directory (e.g. SAVE/hf_source of a from-hf import): "
        "its ids, documents ended by its eos token (default: the byte-level tokenizer)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx",
    )
    args = parser.parse_args(quiet_warnings(argv))
    try:
        tokenizer = HFTokenizer(args.tokenizer) if args.tokenizer else None
        prefix = preprocess(
            args.input, args.output_prefix, tokenizer, append_eod=args.append_eod,
            min_document_chars=args.min_document_chars, force=args.force,
            json_key=args.json_key,
        )
    except (OSError, ValueError) as err:
        print(f"dsmoe-preprocess: error: {err}", file=sys.stderr)
        return 1
    dataset = open_indexed_dataset(prefix)
    print(
        f"wrote {get_bin_path(prefix)} and {get_idx_path(prefix)}: {len(dataset)} documents, "
        f"{int(dataset.sequence_lengths.sum())} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
