"""Readers that turn a source (synthetic, MovieLens folder, any table) into the raw tables.

Every reader returns `RawTables` with one normalized raw schema, so cleaning and indexing are written once:
- interactions: user (string), item (string), timestamp (bigint, epoch seconds), rating (double, nullable)
- items (optional): item (string), categories (array<string>), title (string, nullable: the item's name where
  the source has one)
- users (optional): user (string) + one string column per user attribute, named ``attr_<name>``
Schema problems are raised as `DataValidationError` here, before any full pass over the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.synthetic import SyntheticSpec, generate

RAW_INTERACTION_SCHEMA = T.StructType(
    [
        T.StructField("user", T.StringType()),
        T.StructField("item", T.StringType()),
        T.StructField("timestamp", T.LongType()),
        T.StructField("rating", T.DoubleType()),
    ]
)


@dataclasses.dataclass
class RawTables:
    interactions: DataFrame
    items: DataFrame | None = None
    users: DataFrame | None = None
    description: str = ""


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


def read_movielens(spark: SparkSession, path: str | Path) -> RawTables:
    path = Path(path)
    layout = movielens_layout(path)
    items = users = None
    if layout == "csv":
        ratings = spark.read.option("header", True).csv(str(path / "ratings.csv"))
        _require_columns(ratings, ["userId", "movieId", "rating", "timestamp"], f"{path}/ratings.csv")
        interactions = _normalize(ratings, "userId", "movieId", "timestamp", "rating", source=str(path))
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
        ratings = _read_double_colon(spark, ratings_file, ["user", "item", "rating", "timestamp"])
        interactions = _normalize(ratings, "user", "item", "timestamp", "rating", source=str(ratings_file))
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
        ratings = spark.read.option("sep", "\t").csv(str(path / "u.data")).toDF("user", "item", "rating", "timestamp")
        interactions = _normalize(ratings, "user", "item", "timestamp", "rating", source=str(path / "u.data"))
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
    return RawTables(interactions=interactions, items=items, users=users, description=f"movielens ({layout}) {path}")


def _genres_from_pipe(df: DataFrame, item_col: str, genres_col: str, title_col: str | None) -> DataFrame:
    genres = F.filter(F.split(F.col(genres_col), r"\|"), lambda g: (g != "") & (g != "(no genres listed)"))
    title = F.col(title_col).cast("string") if title_col else F.lit(None).cast("string")
    return df.select(F.col(item_col).cast("string").alias("item"), genres.alias("categories"), title.alias("title"))


# ----------------------------------------------------------------------------------------------- any table
@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str | None = None
    item_categories: str | None = None  # array<string> or a delimited string
    category_separator: str = "|"
    user_features: tuple[str, ...] = ()
    item_name: str | None = None  # the item's title / name (any type; read as a string)


def read_table(spark: SparkSession, path: str, mapping: ColumnMapping, fmt: str = "auto") -> RawTables:
    p = Path(path.removeprefix("file://"))
    if "://" not in path and not p.exists():
        raise DataValidationError(f"table source: path {path!r} does not exist")
    if fmt == "auto":
        suffixes = {s.suffix.lower() for s in ([p] if p.is_file() else p.rglob("*.*"))}
        fmt = "csv" if ".csv" in suffixes and ".parquet" not in suffixes else "parquet"
    if fmt == "csv":
        df = spark.read.option("header", True).option("inferSchema", True).csv(path)
    elif fmt == "parquet":
        df = spark.read.parquet(path)
    else:
        raise DataValidationError(f"table source: format must be 'auto', 'csv' or 'parquet', got {fmt!r}")
    needed = [mapping.user, mapping.item, mapping.timestamp]
    needed += [c for c in (mapping.rating, mapping.item_categories, mapping.item_name) if c]
    needed += list(mapping.user_features)
    _require_columns(df, needed, path)
    interactions = _normalize(df, mapping.user, mapping.item, mapping.timestamp, mapping.rating, source=path)
    items = users = None
    cats = F.array().cast("array<string>")
    if mapping.item_categories:
        cat = df.schema[mapping.item_categories].dataType
        if isinstance(cat, T.ArrayType):
            cats = F.transform(F.col(mapping.item_categories), lambda c: c.cast("string"))
        elif isinstance(cat, T.StringType):
            cats = F.filter(
                F.split(F.col(mapping.item_categories), _regex_escape(mapping.category_separator)),
                lambda g: g != "",
            )
        else:
            raise DataValidationError(
                f"table source: item category column {mapping.item_categories!r} has type {cat.simpleString()}; "
                "expected array<string> or a delimited string"
            )
    if mapping.item_categories or mapping.item_name:
        title = F.col(mapping.item_name).cast("string") if mapping.item_name else F.lit(None).cast("string")
        items = df.select(
            F.col(mapping.item).cast("string").alias("item"), cats.alias("categories"), title.alias("title")
        ).dropDuplicates(["item"])
    if mapping.user_features:
        users = df.select(
            F.col(mapping.user).cast("string").alias("user"),
            *[F.col(c).cast("string").alias(f"attr_{c}") for c in mapping.user_features],
        ).dropDuplicates(["user"])
    return RawTables(interactions=interactions, items=items, users=users, description=f"table {path} ({fmt})")


def _regex_escape(sep: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in sep)


# ----------------------------------------------------------------------------------------------- shared
def _require_columns(df: DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(f"{where}: missing column(s) {missing}; the table has {df.columns}")


_ID_TYPES = (T.StringType, T.IntegerType, T.LongType, T.ShortType, T.ByteType)
_NUMERIC = (T.IntegerType, T.LongType, T.ShortType, T.ByteType, T.FloatType, T.DoubleType, T.DecimalType)


def _normalize(df: DataFrame, user: str, item: str, timestamp: str, rating: str | None, *, source: str) -> DataFrame:
    """Checks the key columns' types (schema only, no pass over the data) and casts to the raw schema.

    String columns from CSV readers without schema inference are accepted when they are integer-like; a value
    that does not parse becomes null and is reported by the cleaning step (counted, or refused)."""
    for col, role in ((user, "user id"), (item, "item id")):
        dt = df.schema[col].dataType
        if not isinstance(dt, _ID_TYPES):
            raise DataValidationError(
                f"{source}: {role} column {col!r} has type {dt.simpleString()}; expected a string or integer type"
            )
    ts_type = df.schema[timestamp].dataType
    if isinstance(ts_type, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        ts = F.unix_timestamp(F.col(timestamp).cast("timestamp"))
    elif isinstance(ts_type, _NUMERIC):
        ts = F.col(timestamp).cast("bigint")
    elif isinstance(ts_type, T.StringType):
        # MovieLens files are read untyped: an integer-like string is an epoch timestamp.
        ts = F.col(timestamp).cast("bigint")
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
        rating_col = F.col(rating).cast("double")
    else:
        rating_col = F.lit(None).cast("double")
    return df.select(
        F.col(user).cast("string").alias("user"),
        F.col(item).cast("string").alias("item"),
        ts.alias("timestamp"),
        rating_col.alias("rating"),
    )
