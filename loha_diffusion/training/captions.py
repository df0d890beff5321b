"""Captions: caption files and `metadata.jsonl` read the one strict way, and caption lengths in tokens.

Text is UTF-8; a leading UTF-8 byte-order mark (`EF BB BF`, written by Windows Notepad) is dropped, and a file
that starts with a UTF-16 byte-order mark is read as UTF-16 (Notepad's "Unicode"). Anything else that is not
UTF-8 (Latin-1 or Windows-1252 bytes, binary data) is a `DataError` naming the file (and line, for
`metadata.jsonl`) and the fix, never a guess: a guessed encoding would train on wrong words without a word.
A caption holding control characters (other than tab and line breaks) is binary data, also refused. A caption
that is empty or only whitespace counts as missing (`on_missing_caption` applies).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, format_problems

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SAVE_AS_UTF8 = "save it as UTF-8 (in most editors: Save As, encoding UTF-8)"


def _not_utf8(where: str, data: bytes, exc: UnicodeDecodeError) -> DataError:
    bad = data[exc.start : exc.start + 1].hex()
    if b"\x00" in data:
        kind = "UTF-16 text without a byte-order mark" if _looks_like_utf16(data) else "binary data, not text"
    else:
        kind = "text in another encoding (Latin-1 or Windows-1252?)"
    return DataError(
        f"{where}: not UTF-8: byte 0x{bad} at offset {exc.start} looks like {kind}; {SAVE_AS_UTF8}"
    )


def check_caption_text(text: str, where: str) -> str:
    """`text` stripped of surrounding whitespace.

    Raises:
        DataError: `text` holds control characters (binary data); the message names `where` and the fix.
    """
    found = _CONTROL.search(text)
    if found and _looks_like_utf16(text):
        raise DataError(f"{where}: looks like UTF-16 text without a byte-order mark; {SAVE_AS_UTF8}")
    if found:
        raise DataError(
            f"{where}: holds binary data (control character U+{ord(found.group()):04X} at character "
            f"{found.start()}), not a caption; write the caption as plain text and {SAVE_AS_UTF8}"
        )
    return text.strip()


def _looks_like_utf16(text: str | bytes) -> bool:
    """Every other character NUL (at least 2 of them): mostly-ASCII text saved as UTF-16 without a BOM."""
    zero = 0 if isinstance(text, bytes) else "\x00"
    odd, even = text[1::2], text[::2]
    return len(text) >= 4 and (odd.count(zero) == len(odd) or even.count(zero) == len(even))


def decode_text(data: bytes, where: str) -> str:
    """Bytes of a caption or metadata file as text: UTF-8 (a leading BOM dropped) or UTF-16 with a BOM.

    Raises:
        DataError: the bytes are not UTF-8 (nor BOM-marked UTF-16); the message names `where`, the offending
            byte and offset, what the bytes look like, and the fix (save it as UTF-8).
    """
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: broken UTF-16 text ({exc.reason}); {SAVE_AS_UTF8}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(where, data, exc) from None


def read_caption_file(path: Path) -> str | None:
    """The caption in `path`, stripped; None when the file does not exist or holds only whitespace.

    Raises:
        DataError: the file cannot be read, is not UTF-8 text, or holds binary data (see the module docstring);
            the message names the file and the fix.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the caption file ({exc.strerror or exc})") from None
    caption = check_caption_text(decode_text(data, str(path)), str(path))
    return caption or None


@dataclass(frozen=True)
class MetadataRow:
    """One `metadata.jsonl` entry: the image (inside the dataset folder), its caption (None when missing or
    only whitespace) and the line it came from (1-based)."""

    path: Path
    caption: str | None
    line: int


def resolve_inside(root: Path, name: str) -> Path | None:
    """`root / name` with `..` and `.` parts folded, or None when it points outside `root`.

    The check is on the path as written (symbolic links inside `root` are followed later, as the user made them).
    """
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, name))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return root / os.path.relpath(full, base)


def _metadata_lines(metadata: Path) -> list[tuple[int, str | DataError]]:
    """Each non-blank line of `metadata` as text, or the error of a line that is not UTF-8."""
    data = metadata.read_bytes()
    if data.startswith(_UTF16_BOMS):
        text = decode_text(data, str(metadata))
        return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    data = data.removeprefix(codecs.BOM_UTF8)
    lines: list[tuple[int, str | DataError]] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            lines.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            lines.append((n, _not_utf8(f"{metadata}:{n}", raw, exc)))
    return lines


def _metadata_row(
    root: Path, where: str, row: Any, image_column: str, caption_column: str
) -> tuple[Path, str | None] | str:
    """The (image path, caption) of one parsed line, or the problem with it."""
    if not isinstance(row, dict) or image_column not in row:
        return f"{where}: no {image_column!r} key (set image_column to the right key)"
    name = row[image_column]
    if not isinstance(name, str) or not name.strip():
        return f"{where}: {image_column!r} is {name!r}, not a file name"
    path = resolve_inside(root, name)
    if path is None:
        return (
            f"{where}: {image_column!r} {name!r} points outside the dataset folder {root} (refused); move the "
            "image into the folder and name it relative to the folder"
        )
    caption = row.get(caption_column)
    if caption is not None and not isinstance(caption, str):
        return f"{where}: {caption_column!r} is not a string"
    if caption is not None:
        try:
            caption = check_caption_text(caption, where) or None
        except DataError as exc:
            return str(exc)
    return path, caption


def read_metadata(root: Path, image_column: str, caption_column: str) -> list[MetadataRow]:
    """The entries of `root/metadata.jsonl` (diffusers' imagefolder), in file order.

    Raises:
        DataError: lines that are not UTF-8 or not JSON objects, lack `image_column`, name a file outside
            `root` (`..`, an absolute path elsewhere), or have a caption that is not a string or holds binary
            data; every bad line is listed with its number and the fix.
    """
    metadata = root / "metadata.jsonl"
    rows, problems = [], []
    for n, line in _metadata_lines(metadata):
        where = f"{metadata}:{n}"
        if isinstance(line, DataError):
            problems.append(str(line))
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        found = _metadata_row(root, where, parsed, image_column, caption_column)
        if isinstance(found, str):
            problems.append(found)
        else:
            rows.append(MetadataRow(found[0], found[1], n))
    if problems:
        raise DataError(format_problems(f"{metadata} cannot be used:", [("bad lines", problems)], shown=10))
    return rows


def caption_token_counts(tokenizer: Any, captions: Sequence[str]) -> list[int]:
    """Tokens of each caption as the text encoder gets it, start and end tokens included (CLIP: the limit
    `tokenizer.model_max_length` is 77, so 75 words-pieces of text). `tokenizer` is a transformers tokenizer."""
    unique = sorted(set(captions))
    if not unique:
        return []
    # verbose=False: no "longer than the maximum" warning; reporting that is the caller's job.
    ids = tokenizer(unique, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    counts = {caption: len(tokens) for caption, tokens in zip(unique, ids)}
    return [counts[c] for c in captions]
