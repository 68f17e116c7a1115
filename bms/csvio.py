"""Numeric CSV files with a header row: parameter tables, test data, logs and estimates.

One reader for every CSV pybms takes in, so each gets the same clear errors (file, line,
column) instead of a numpy traceback, and one writer, so every output has the same format.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np


class CsvError(Exception):
    """A CSV file that cannot be used, with the file and line in the message."""


def read_columns(
    path: Path, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Read the named columns of ``path`` as float64 arrays; other columns are ignored.

    Raises CsvError when the file is unreadable, a required column is missing, a row is short,
    or a value is not a finite number (an empty cell included).
    """
    path = Path(path)
    required = list(required)
    try:
        # utf-8-sig: spreadsheets write a byte-order mark before the header.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            # (line number, cells); blank lines carry nothing and are skipped
            rows = [(reader.line_num, row) for row in reader if row]
    except OSError as exc:
        raise CsvError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CsvError(f"{path}: not a CSV text file: {exc}") from None
    if not rows:
        raise CsvError(f"{path}: empty file (expected a header row)")
    if len(rows) < 2:
        raise CsvError(f"{path}: no data rows")
    header = [name.strip() for name in rows[0][1]]
    missing = [name for name in required if name not in header]
    if missing:
        raise CsvError(
            f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})"
        )
    wanted = required + [name for name in optional if name in header]
    index = {name: header.index(name) for name in wanted}
    data = {name: np.empty(len(rows) - 1) for name in wanted}
    for k, (line, row) in enumerate(rows[1:]):
        for name, column in index.items():
            try:
                value = float(row[column])
            except IndexError:
                raise CsvError(f"{path}:{line}: row has no {name!r} column") from None
            except ValueError:
                raise CsvError(f"{path}:{line}: {name} is not a number: {row[column]!r}") from None
            if not math.isfinite(value):
                raise CsvError(f"{path}:{line}: {name} is not finite: {row[column]!r}")
            data[name][k] = value
    return data


def write_columns(path: Path, columns: dict[str, np.ndarray], digits: dict[str, int]) -> None:
    """Write equal-length columns to ``path`` with a header; ``digits`` decimals per column."""
    names = list(columns)
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(names)
        formats = [f"{{:.{digits[name]}f}}" for name in names]
        for values in zip(*(columns[name] for name in names), strict=True):
            writer.writerow([fmt.format(v) for fmt, v in zip(formats, values, strict=True)])
