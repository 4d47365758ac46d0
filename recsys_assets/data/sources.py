"""Readers that turn a source (synthetic, MovieLens folder, any table) into the raw tables.

Every reader returns `RawTables` with one normalized raw schema, so cleaning and indexing are written once:
- interactions: user (string), item (string), timestamp (bigint, epoch seconds), rating (double, nullable).
  A table without time gets, as its timestamp, each row's position in the user's order (`ORDERS`): a seeded
  random order per user, or the file's row order. Splits in such an order are leave-last-out, not temporal.
- items (optional): item (string), categories (array<string>), title (string, nullable: the item's name where
  the source has one)
- users (optional): user (string) + one string column per user attribute, named ``attr_<name>``
Schema problems are raised as `DataValidationError` here, before any full pass over the data. Text files are
read line by line (`recsys_assets.data.lines`): a malformed line (wrong field count, a missing key, an id that is
not an integer where the layout's ids are integers, a timestamp or rating that does not parse) is named by file
and line, and refused (``bad_lines="fail"``) or dropped and counted (``bad_lines="drop"``).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.lines import INT_RE, ROW_INDEX, check_policy, input_files, read_numbered_lines
from recsys_assets.data.synthetic import SyntheticSpec, generate

RAW_INTERACTION_SCHEMA = T.StructType(
    [
        T.StructField("user", T.StringType()),
        T.StructField("item", T.StringType()),
        T.StructField("timestamp", T.LongType()),
        T.StructField("rating", T.DoubleType()),
    ]
)


# How each user's rows are ordered, so the last one can be held out: by time, or, for a table without time,
# in a seeded random order per user or in the file's row order.
ORDERS = ("timestamp", "random", "row")


@dataclasses.dataclass
class RawTables:
    interactions: DataFrame
    items: DataFrame | None = None
    users: DataFrame | None = None
    description: str = ""
    order: str = "timestamp"  # one of ORDERS
    bad_lines: int = 0  # malformed lines dropped (bad_lines="drop")
    bad_examples: list[str] = dataclasses.field(default_factory=list)  # "file:line: problem", the first few


# ----------------------------------------------------------------------------------------------- synthetic
def read_synthetic(spark: SparkSession, spec: SyntheticSpec) -> RawTables:
    data = generate(spec)
    interactions = spark.createDataFrame(data.interactions)
    items = spark.createDataFrame(data.items)
    users = spark.createDataFrame(data.users.rename(columns={c: f"attr_{c}" for c in ("age_group", "region")}))
    return RawTables(
        interactions=_normalize(interactions, "user", "item", "timestamp", "rating", source="synthetic"),
        items=items.select(F.col("item").cast("string").alias("item"), F.col("categories")),
        users=users.select(F.col("user").cast("string").alias("user"), *[c for c in users.columns if c != "user"]),
        description=f"synthetic {spec}",
    )


# ----------------------------------------------------------------------------------------------- movielens
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def movielens_layout(path: Path) -> str:
    """Which public MovieLens layout a path holds: 'csv' (ml-latest*, ml-20m, ml-25m), 'dat' (ml-1m, ml-10m),
    'u.data' (ml-100k) or 'dat-file' (a single ``user::item::rating::timestamp`` file, e.g. pyspark's sample)."""
    if not path.exists():
        raise DataValidationError(f"movielens source: path {str(path)!r} does not exist")
    if path.is_file():
        return "dat-file"
    if (path / "ratings.csv").is_file():
        return "csv"
    if (path / "ratings.dat").is_file():
        return "dat"
    if (path / "u.data").is_file():
        return "u.data"
    found = sorted(p.name for p in path.iterdir())[:20]
    raise DataValidationError(
        f"movielens source: {str(path)!r} holds none of ratings.csv, ratings.dat, u.data (found: {found})"
    )


def _read_double_colon(spark: SparkSession, path: Path, names: Sequence[str]) -> DataFrame:
    # ml-1m/10m files are latin-1 and '::'-separated; Spark's CSV reader takes a multi-character separator.
    df = spark.read.option("sep", "::").option("encoding", "ISO-8859-1").csv(str(path))
    if len(df.columns) < len(names):
        raise DataValidationError(
            f"movielens source: {str(path)!r} has {len(df.columns)} '::'-separated fields, expected {len(names)}"
        )
    return df.select(*[F.col(f"_c{i}").alias(n) for i, n in enumerate(names)])


def _read_ratings(
    spark: SparkSession, file: Path, sep: str, header: bool, bad_lines: str
) -> tuple[DataFrame, TextRead]:
    """A MovieLens ratings file, line by line: integer user / item ids and timestamp, a numeric rating."""
    names = ["user", "item", "rating", "timestamp"]
    if header:  # ratings.csv: userId,movieId,rating,timestamp
        names = ["userId", "movieId", "rating", "timestamp"]
    read = read_delimited(
        spark,
        str(file),
        what="movielens source",
        sep=sep,
        header=header,
        names=None if header else names,
        integer=[names[0], names[1], names[3]],
        numeric=[names[2]],
        bad_lines=bad_lines,
    )
    _require_columns(read.df, names, str(file))
    return _normalize(read.df, names[0], names[1], names[3], names[2], source=str(file)), read


def read_movielens(spark: SparkSession, path: str | Path, *, bad_lines: str = "fail") -> RawTables:
    path = Path(path)
    layout = movielens_layout(path)
    check_policy(bad_lines, "movielens source")
    items = users = None
    if layout == "csv":
        interactions, read = _read_ratings(spark, path / "ratings.csv", ",", True, bad_lines)
        if (path / "movies.csv").is_file():
            movies = (
                spark.read.option("header", True)
                .option("quote", '"')
                .option("escape", '"')
                .csv(str(path / "movies.csv"))
            )
            _require_columns(movies, ["movieId", "genres"], f"{path}/movies.csv")
            items = _genres_from_pipe(movies, "movieId", "genres", "title" if "title" in movies.columns else None)
    elif layout in ("dat", "dat-file"):
        ratings_file = path if layout == "dat-file" else path / "ratings.dat"
        interactions, read = _read_ratings(spark, ratings_file, "::", False, bad_lines)
        if layout == "dat" and (path / "movies.dat").is_file():
            movies = _read_double_colon(spark, path / "movies.dat", ["item", "title", "genres"])
            items = _genres_from_pipe(movies, "item", "genres", "title")
        if layout == "dat" and (path / "users.dat").is_file():  # ml-1m only
            u = _read_double_colon(spark, path / "users.dat", ["user", "gender", "age", "occupation", "zip"])
            users = u.select(
                F.col("user").cast("string").alias("user"),
                *[F.col(c).cast("string").alias(f"attr_{c}") for c in ("gender", "age", "occupation")],
            )
    else:  # ml-100k
        interactions, read = _read_ratings(spark, path / "u.data", "\t", False, bad_lines)
        if (path / "u.item").is_file():
            raw = spark.read.option("sep", "|").option("encoding", "ISO-8859-1").csv(str(path / "u.item"))
            flags = raw.columns[-len(ML100K_GENRES) :]
            genres = F.filter(
                F.array(*[F.when(F.col(c) == "1", F.lit(g)) for c, g in zip(flags, ML100K_GENRES)]),
                lambda g: g.isNotNull(),
            )
            items = raw.select(
                F.col("_c0").cast("string").alias("item"), genres.alias("categories"), F.col("_c1").alias("title")
            )
        if (path / "u.user").is_file():
            u = (
                spark.read.option("sep", "|")
                .csv(str(path / "u.user"))
                .toDF("user", "age", "gender", "occupation", "zip")
            )
            users = u.select(
                F.col("user").cast("string").alias("user"),
                (F.floor(F.col("age").cast("int") / 10) * 10).cast("string").alias("attr_age_decade"),
                F.col("gender").alias("attr_gender"),
                F.col("occupation").alias("attr_occupation"),
            )
    return RawTables(
        interactions=interactions,
        items=items,
        users=users,
        description=f"movielens ({layout}) {path}",
        bad_lines=read.bad_lines,
        bad_examples=read.bad_examples,
    )


def _genres_from_pipe(df: DataFrame, item_col: str, genres_col: str, title_col: str | None) -> DataFrame:
    genres = F.filter(F.split(F.col(genres_col), r"\|"), lambda g: (g != "") & (g != "(no genres listed)"))
    title = F.col(title_col).cast("string") if title_col else F.lit(None).cast("string")
    return df.select(F.col(item_col).cast("string").alias("item"), genres.alias("categories"), title.alias("title"))


# ----------------------------------------------------------------------------------------------- text tables
TEXT_SUFFIXES = {".csv", ".tsv", ".dat", ".txt", ".inter"}  # .inter: RecBole


@dataclasses.dataclass
class TextRead:
    df: DataFrame  # the named columns (strings, "" read as null) + row_index
    lines: int
    bad_lines: int
    bad_examples: list[str]


BOM = "\ufeff"  # a UTF-8 byte-order mark, as spreadsheet programs write it: not part of the first field
WHITESPACE = "whitespace"  # the separator of files whose fields are split by runs of spaces or tabs


def _first_line(file: str) -> str:
    with open(file, encoding="utf-8", errors="replace") as f:
        return f.readline().rstrip("\r\n").removeprefix(BOM)


def _header_names(first: str, sep: str) -> list[str]:
    if sep == ",":
        return [c.strip() for c in next(csv.reader([first]))]  # RFC 4180: quotes, "" inside quotes
    if sep == WHITESPACE:
        return first.split()
    return [c.strip().strip('"') for c in first.split(sep)]


def read_delimited(
    spark: SparkSession,
    path: str,
    *,
    what: str,
    sep: str | None = None,
    header: bool = True,
    names: Sequence[str] | None = None,
    required: Sequence[str] = (),
    integer: Sequence[str] = (),
    numeric: Sequence[str] = (),
    times: Sequence[str] = (),
    bad_lines: str = "fail",
) -> TextRead:
    """A delimited text file (or a folder of them), every line numbered and checked before use.

    `sep`: the field separator; by default a tab when the header line has one, else a comma (a comma file may
    quote fields as RFC 4180 does, a doubled quote inside quotes standing for one; `WHITESPACE` splits on runs of
    spaces and tabs; other separators split exactly). `header`: the first line of each file names the columns,
    else `names` does. A UTF-8 byte-order mark at the start of a file is dropped. A line is malformed when it has
    more fields than columns, or a column of `required` / `integer` is empty, or a value of `integer` is not an
    integer, of `numeric` not a number, of `times` neither epoch seconds nor a date / time. Blank lines are
    skipped."""
    files = input_files(path, what)
    first = _first_line(files[0])
    if header:
        sep = sep or ("\t" if "\t" in first else ",")
        names = _header_names(first, sep)
    elif not names:
        raise DataValidationError(f"{what}: a file without a header line needs its column names (columns: [...])")
    else:
        sep = sep or ("\t" if "\t" in first else WHITESPACE if " " in first.strip() else ",")
    if len(set(names)) != len(names):
        raise DataValidationError(f"{path}: repeated column names in {names}")
    names = list(names)
    n = len(names)
    at = {c: i for i, c in enumerate(names)}
    unknown = [c for c in (*required, *integer, *numeric, *times) if c not in at]
    if unknown:
        raise DataValidationError(
            f"{path}: missing column(s) {sorted(set(unknown), key=unknown.index)}; the table has {names}"
        )

    def fields(value: Column) -> list[Column]:
        line = F.regexp_replace(F.regexp_replace(value, "\r$", ""), f"^{BOM}", "")  # CRLF files; a BOM
        if sep == ",":
            schema = ", ".join(f"`c{i}` STRING" for i in range(n + 1))
            parsed = F.from_csv(line, schema, {"sep": ",", "quote": '"', "escape": '"'})  # RFC 4180's ""
            cols = [parsed.getField(f"c{i}") for i in range(n + 1)]
        elif sep == WHITESPACE:
            parts = F.split(F.trim(F.regexp_replace(line, "\t", " ")), " +", -1)
            cols = [F.get(parts, i) for i in range(n + 1)]
        else:
            parts = F.split(line, _regex_escape(sep), -1)
            cols = [F.get(parts, i) for i in range(n + 1)]
        return [F.when(F.trim(c) != "", F.trim(c)) for c in cols]  # "" → null: a missing value

    def problem(value: Column) -> Column:
        f = fields(value)
        check = F.when(F.trim(value) == "", F.lit(None)).when(
            f[n].isNotNull(), F.lit(f"more than {n} fields (expected {n}: {', '.join(names)})")
        )
        for c in dict.fromkeys([*required, *integer]):
            check = check.when(f[at[c]].isNull(), F.lit(f"no value for column {c!r}"))
        for c in integer:
            value_c = F.substring(f[at[c]], 1, 30)
            check = check.when(~f[at[c]].rlike(INT_RE), F.format_string(f"column {c!r}: %s is not an integer", value_c))
        for c in numeric:
            bad = f[at[c]].isNotNull() & f[at[c]].try_cast("double").isNull()
            check = check.when(bad, F.format_string(f"column {c!r}: %s is not a number", F.substring(f[at[c]], 1, 30)))
        for c in times:
            bad = f[at[c]].isNotNull() & ~f[at[c]].rlike(INT_RE) & F.try_to_timestamp(f[at[c]]).isNull()
            check = check.when(
                bad,
                F.format_string(
                    f"column {c!r}: %s is neither epoch seconds nor a date/time", F.substring(f[at[c]], 1, 30)
                ),
            )
        return check

    lines = read_numbered_lines(spark, files, problem, what=what, skip_header=header)
    good, examples = lines.good(bad_lines, what, f"{n} {sep!r}-separated fields: {', '.join(names)}")
    f = fields(F.col("value"))
    df = good.filter(F.trim("value") != "").select(*[f[i].alias(c) for i, c in enumerate(names)], F.col(ROW_INDEX))
    return TextRead(df, lines.lines, lines.bad_lines, examples)


# ----------------------------------------------------------------------------------------------- any table
@dataclasses.dataclass(frozen=True)
class ItemTable:
    """A side table of item features, joined to the interactions by item id: one row per item, or one row per
    (item, category) pair (e.g. Last.fm's user_taggedartists.dat: artistID, tagID)."""

    path: str
    item: str
    category: str | None = None  # one category per row, or a delimited string (category_separator)
    category_separator: str | None = None
    name: str | None = None  # the item's title / name
    max_categories: int = 20  # the item's most frequent categories kept (a long tail of rare tags adds noise)


@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    user: str = "user"
    item: str = "item"
    timestamp: str | None = "timestamp"  # None: a table without time (see `order`)
    rating: str | None = None
    item_categories: str | None = None  # array<string> or a delimited string
    category_separator: str = "|"
    user_features: tuple[str, ...] = ()
    item_name: str | None = None  # the item's title / name (any type; read as a string)
    order: str = "timestamp"  # ORDERS: "timestamp" needs the timestamp column; "random" / "row" need none
    order_seed: int = 0  # the seed of the "random" order
    integer_ids: bool = False  # ids must be integers: a line whose id is not is malformed
    separator: str | None = None  # text files: None = a tab when the header has one, else a comma; or WHITESPACE
    header: bool = True  # text files: the first line names the columns; False: `columns` does
    columns: tuple[str, ...] = ()  # text files without a header line: their column names, in order
    item_tables: tuple[ItemTable, ...] = ()

    def validate(self) -> None:
        if not self.header and not self.columns:
            raise DataValidationError(
                "table source: header is false, so the file's columns must be named: columns: [user, item, ...]"
            )
        if self.header and self.columns:
            raise DataValidationError(
                f"table source: columns {list(self.columns)} are for a file without a header line; set header: false"
            )
        if self.order not in ORDERS:
            raise DataValidationError(f"table source: order must be one of {ORDERS}, got {self.order!r}")
        if self.timestamp is None and self.order == "timestamp":
            raise DataValidationError(
                "table source: no timestamp column; set order to 'random' (a seeded random order per user) or "
                "'row' (the file's row order)"
            )
        if self.timestamp is not None and self.order != "timestamp":
            raise DataValidationError(
                f"table source: order {self.order!r} is for a table without time; drop timestamp_column "
                f"({self.timestamp!r}) or keep order 'timestamp'"
            )


def _table_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path.removeprefix("file://"))
    suffixes = {s.suffix.lower() for s in ([p] if p.is_file() else p.rglob("*.*"))}
    return "csv" if suffixes & TEXT_SUFFIXES and ".parquet" not in suffixes else "parquet"


def _read_any(
    spark, path: str, fmt: str, what: str, sep: str | None, bad_lines: str, *, header=True, names=None, **checks
) -> TextRead:
    p = Path(path.removeprefix("file://"))
    if "://" not in path and not p.exists():
        raise DataValidationError(f"{what}: path {path!r} does not exist")
    fmt = _table_format(path, fmt)
    if fmt == "csv":
        return read_delimited(
            spark, path, what=what, sep=sep, header=header, names=names, bad_lines=bad_lines, **checks
        )
    if fmt == "parquet":
        df = spark.read.parquet(path)
        return TextRead(df.withColumn(ROW_INDEX, F.monotonically_increasing_id()), -1, 0, [])
    raise DataValidationError(f"{what}: format must be 'auto', 'csv' or 'parquet', got {fmt!r}")


def read_table(
    spark: SparkSession, path: str, mapping: ColumnMapping, fmt: str = "auto", *, bad_lines: str = "fail"
) -> RawTables:
    mapping.validate()
    check_policy(bad_lines, "table source")
    ids = [mapping.user, mapping.item]
    read = _read_any(
        spark,
        path,
        fmt,
        "table source",
        mapping.separator,
        bad_lines,
        header=mapping.header,
        names=mapping.columns or None,
        required=ids,
        integer=ids if mapping.integer_ids else (),
        numeric=[mapping.rating] if mapping.rating else (),
        times=[mapping.timestamp] if mapping.timestamp else (),
    )
    df = read.df
    needed = [c for c in (mapping.user, mapping.item, mapping.timestamp) if c]
    needed += [c for c in (mapping.rating, mapping.item_categories, mapping.item_name) if c]
    needed += list(mapping.user_features)
    _require_columns(df, needed, path)
    interactions = _normalize(
        df, mapping.user, mapping.item, mapping.timestamp, mapping.rating, source=path, order=_order_key(mapping)
    )
    items = _items_of_table(df, mapping)
    for side in mapping.item_tables:
        items = _union_items(items, _read_item_table(spark, side, mapping, bad_lines))
    users = None
    if mapping.user_features:
        users = df.select(
            F.col(mapping.user).cast("string").alias("user"),
            *[F.col(c).cast("string").alias(f"attr_{c}") for c in mapping.user_features],
        ).dropDuplicates(["user"])
    return RawTables(
        interactions=interactions,
        items=items,
        users=users,
        description=f"table {path} ({_table_format(path, fmt)}{'' if mapping.timestamp else ', no time: ' + mapping.order + ' order'})",
        order=mapping.order,
        bad_lines=read.bad_lines,
        bad_examples=read.bad_examples,
    )


def _order_key(mapping: ColumnMapping) -> Column | None:
    """What orders a user's rows in a table without time: the file position, or a seeded hash of the row."""
    if mapping.order == "row":
        return F.col(ROW_INDEX)
    if mapping.order == "random":
        # A hash, not rand(): the same order whatever the partitioning, and a new one for each seed.
        return F.xxhash64(
            F.col(mapping.user).cast("string"), F.col(mapping.item).cast("string"), F.lit(mapping.order_seed)
        )
    return None


def _categories(df: DataFrame, column: str, separator: str | None) -> Column:
    cat = df.schema[column].dataType
    if isinstance(cat, T.ArrayType):
        return F.transform(F.col(column), lambda c: c.cast("string"))
    if separator is None:  # one category per row
        return F.array(F.col(column).cast("string"))
    if isinstance(cat, T.StringType):
        return F.filter(F.split(F.col(column), _regex_escape(separator)), lambda g: g != "")
    raise DataValidationError(
        f"table source: item category column {column!r} has type {cat.simpleString()}; "
        "expected array<string> or a delimited string"
    )


def _items_of_table(df: DataFrame, mapping: ColumnMapping) -> DataFrame | None:
    if not (mapping.item_categories or mapping.item_name):
        return None
    cats = F.array().cast("array<string>")
    if mapping.item_categories:
        cats = _categories(df, mapping.item_categories, mapping.category_separator)
    title = F.col(mapping.item_name).cast("string") if mapping.item_name else F.lit(None).cast("string")
    return df.select(
        F.col(mapping.item).cast("string").alias("item"),
        F.coalesce(cats, F.array().cast("array<string>")).alias("categories"),
        title.alias("title"),
    ).dropDuplicates(["item"])


def _read_item_table(spark, side: ItemTable, mapping: ColumnMapping, bad_lines: str) -> DataFrame:
    """item, categories (over the item's rows: its `max_categories` most frequent), title (the first non-null)."""
    what = f"item table {side.path}"
    read = _read_any(
        spark,
        side.path,
        "auto",
        what,
        None,
        bad_lines,
        required=[side.item],
        integer=[side.item] if mapping.integer_ids else (),
    )
    df = read.df
    _require_columns(df, [c for c in (side.item, side.category, side.name) if c], side.path)
    cats = _categories(df, side.category, side.category_separator) if side.category else F.array().cast("array<string>")
    title = F.col(side.name).cast("string") if side.name else F.lit(None).cast("string")
    rows = df.select(
        F.col(side.item).cast("string").alias("item"),
        F.explode_outer(F.coalesce(cats, F.array().cast("array<string>"))).alias("_cat"),
        title.alias("title"),
    )
    # An item's most frequent categories first (e.g. the tags most users gave an artist), at most max_categories.
    counted = rows.groupBy("item", "_cat").agg(
        F.count(F.lit(1)).alias("_n"), F.first("title", ignorenulls=True).alias("title")
    )
    by_item = Window.partitionBy("item").orderBy(F.col("_n").desc(), F.col("_cat"))
    kept = counted.withColumn("_r", F.row_number().over(by_item))
    return kept.groupBy("item").agg(
        F.array_sort(
            F.collect_list(F.when((F.col("_r") <= side.max_categories) & F.col("_cat").isNotNull(), F.col("_cat")))
        ).alias("categories"),
        F.first("title", ignorenulls=True).alias("title"),
    )


def _union_items(a: DataFrame | None, b: DataFrame) -> DataFrame:
    if a is None:
        return b
    both = a.unionByName(b)
    return both.groupBy("item").agg(
        F.array_sort(F.array_distinct(F.flatten(F.collect_list("categories")))).alias("categories"),
        F.first("title", ignorenulls=True).alias("title"),
    )


def _regex_escape(sep: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in sep)


# ----------------------------------------------------------------------------------------------- shared
def _require_columns(df: DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(f"{where}: missing column(s) {missing}; the table has {df.columns}")


_ID_TYPES = (T.StringType, T.IntegerType, T.LongType, T.ShortType, T.ByteType)
_NUMERIC = (T.IntegerType, T.LongType, T.ShortType, T.ByteType, T.FloatType, T.DoubleType, T.DecimalType)


def _normalize(
    df: DataFrame,
    user: str,
    item: str,
    timestamp: str | None,
    rating: str | None,
    *,
    source: str,
    order: Column | None = None,
) -> DataFrame:
    """Checks the key columns' types (schema only, no pass over the data) and casts to the raw schema.

    Text columns were checked line by line by `read_delimited`. Without a timestamp column, a row's timestamp
    is its 0-based position among its user's rows in `order` (ties: the item id)."""
    for col, role in ((user, "user id"), (item, "item id")):
        dt = df.schema[col].dataType
        if not isinstance(dt, _ID_TYPES):
            raise DataValidationError(
                f"{source}: {role} column {col!r} has type {dt.simpleString()}; expected a string or integer type"
            )
    ts_type = df.schema[timestamp].dataType if timestamp else None
    if timestamp is None:
        if order is None:
            raise DataValidationError(f"{source}: no timestamp column and no order for the rows")
        by_user = Window.partitionBy(F.col(user).cast("string")).orderBy(order, F.col(item).cast("string"))
        ts = (F.row_number().over(by_user) - 1).cast("bigint")
    elif isinstance(ts_type, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        ts = F.unix_timestamp(F.col(timestamp).cast("timestamp"))
    elif isinstance(ts_type, _NUMERIC):
        ts = F.col(timestamp).cast("bigint")
    elif isinstance(ts_type, T.StringType):
        # Text files are read untyped: an integer-like string is epoch seconds, anything else a date / time.
        ts = F.coalesce(F.col(timestamp).try_cast("bigint"), F.unix_timestamp(F.try_to_timestamp(F.col(timestamp))))
    else:
        raise DataValidationError(
            f"{source}: timestamp column {timestamp!r} has type {ts_type.simpleString()}; "
            "expected epoch seconds (integer) or a timestamp/date"
        )
    if rating is not None:
        r_type = df.schema[rating].dataType
        if not isinstance(r_type, _NUMERIC + (T.StringType,)):
            raise DataValidationError(
                f"{source}: rating column {rating!r} has type {r_type.simpleString()}; expected a number"
            )
        rating_col = F.col(rating).try_cast("double")
    else:
        rating_col = F.lit(None).cast("double")
    return df.select(
        F.col(user).cast("string").alias("user"),
        F.col(item).cast("string").alias("item"),
        ts.alias("timestamp"),
        rating_col.alias("rating"),
    )
