"""Text files read line by line in Spark, each line numbered in its file, and validated before use.

The readers of text layouts (Criteo, MovieLens, delimited tables) share this: a malformed line is named by
file and line number, and is either refused (``bad_lines="fail"``, the default) or dropped and counted
(``bad_lines="drop"``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_assets.data.errors import DataValidationError

BAD_LINE_POLICIES = ("fail", "drop")
LINE = "_line"  # 1-based line number in its file
FILE = "_file"
PROBLEM = "_problem"  # null for a good line, else what is wrong with it
ROW_INDEX = "row_index"  # 0-based position over all files, in the order given, lines in file order
INT_RE = r"^-?[0-9]{1,18}$"


def input_files(path: str | Path | Sequence[str | Path], what: str) -> list[str]:
    """Absolute paths of the files named (a folder stands for its visible files, in name order)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith((".", "_")))
            if not found:
                raise DataValidationError(f"{what}: folder {str(p)!r} holds no files")
            files += [os.path.abspath(x) for x in found]
        elif p.is_file():
            files.append(os.path.abspath(p))
        else:
            raise DataValidationError(f"{what}: path {str(p)!r} does not exist")
    return files


@dataclasses.dataclass
class NumberedLines:
    df: DataFrame  # value, _file, _line, row_index, _problem
    files: list[str]
    lines: int
    bad_lines: int

    def examples(self, n: int = 5) -> list[str]:
        """ "file:line: problem" for the first `n` malformed lines."""
        if not self.bad_lines:
            return []
        bad = self.df.filter(F.col(PROBLEM).isNotNull()).orderBy(ROW_INDEX).select(FILE, LINE, PROBLEM).limit(n)
        return [f"{Path(r[FILE].removeprefix('file:')).name}:{r[LINE]}: {r[PROBLEM]}" for r in bad.collect()]

    def good(self, bad_lines: str, what: str, expected: str) -> tuple[DataFrame, list[str]]:
        """The good lines, and examples of the bad ones; refuses any bad line when `bad_lines` is "fail"."""
        examples = self.examples()
        if self.bad_lines and bad_lines == "fail":
            names = ", ".join(self.files) if len(self.files) <= 3 else f"{self.files[0]} and {len(self.files) - 1} more"
            raise DataValidationError(
                f"{what} {names}: {self.bad_lines} of {self.lines} lines are malformed (expected {expected}); "
                f"first: {'; '.join(examples)}. Fix the input or read with bad_lines='drop' (drops and counts them)."
            )
        return self.df.filter(F.col(PROBLEM).isNull()), examples


def check_policy(bad_lines: str, what: str) -> None:
    if bad_lines not in BAD_LINE_POLICIES:
        raise DataValidationError(f"{what}: bad_lines must be 'fail' or 'drop', got {bad_lines!r}")


def read_numbered_lines(
    spark: SparkSession, files: list[str], problem: Callable[[Column], Column], *, what: str, skip_header: bool = False
) -> NumberedLines:
    """Every line of `files` with its file, line number, position and `problem(value)`; one pass to count them.
    `skip_header`: the first line of each file is a header, not data (it keeps its line number 1)."""
    raw = spark.read.text(files).select(
        F.col("value"),
        F.col("_metadata.file_path").alias(FILE),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_mid"),
    )
    # Line numbers without a global sort: rows of one (file, block) are contiguous in one partition, so a row's
    # position in its block is _mid - min(_mid); blocks are ordered by file (as given) and byte offset.
    blocks = raw.groupBy(FILE, "_block").agg(F.count(F.lit(1)).alias("n"), F.min("_mid").alias("mid0")).collect()
    file_order = {}
    for b in blocks:  # spark's _metadata.file_path is a URI; map it back to the order of `files`
        local = b[FILE].removeprefix("file://").removeprefix("file:")
        file_order[b[FILE]] = files.index(local) if local in files else len(files) + len(file_order)
    blocks = sorted(blocks, key=lambda b: (file_order[b[FILE]], b["_block"]))
    offsets, seen_in_file, total = [], {}, 0
    for b in blocks:
        line0 = seen_in_file.get(b[FILE], 0)
        offsets.append((b[FILE], int(b["_block"]), int(b["mid0"]), total, line0))
        seen_in_file[b[FILE]] = line0 + int(b["n"])
        total += int(b["n"])
    if total == 0:
        raise DataValidationError(f"{what}: {files} hold no lines")
    offsets_df = spark.createDataFrame(
        offsets,
        T.StructType(
            [
                T.StructField(FILE, T.StringType()),
                T.StructField("_block", T.LongType()),
                T.StructField("_mid0", T.LongType()),
                T.StructField("_row0", T.LongType()),
                T.StructField("_line0", T.LongType()),
            ]
        ),
    )
    df = (
        raw.join(F.broadcast(offsets_df), [FILE, "_block"])
        .withColumn(ROW_INDEX, F.col("_row0") + F.col("_mid") - F.col("_mid0"))
        .withColumn(LINE, F.col("_line0") + F.col("_mid") - F.col("_mid0") + 1)
    )
    if skip_header:
        df = df.filter(F.col(LINE) > 1)
    df = df.withColumn(PROBLEM, problem(F.col("value"))).select("value", FILE, LINE, ROW_INDEX, PROBLEM).cache()
    counts = df.agg(F.count(F.lit(1)).alias("n"), F.count(PROBLEM).alias("bad")).first()
    return NumberedLines(df=df, files=files, lines=int(counts["n"]), bad_lines=int(counts["bad"]))
